"""The least a Django site needs: no database, FORCE_SCRIPT_NAME unset (the platform's prefix is used)."""

SECRET_KEY = "not-secret-a-test-app"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "djsite.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
