"""The least a Django site needs: no database, FORCE_SCRIPT_NAME unset (the platform's prefix is used),
and static files collected by the app's build step, served by WhiteNoise."""

from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "not-secret-a-test-app"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "djsite.urls"
INSTALLED_APPS = ["django.contrib.staticfiles"]
MIDDLEWARE = ["whitenoise.middleware.WhiteNoiseMiddleware"]
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"  # filled by the build step (collectstatic): part of the image
STATICFILES_DIRS = [BASE_DIR / "djsite" / "static"]
