from django.contrib import admin
from django.http import JsonResponse
from django.urls import path


def over(request):
    return JsonResponse({"over": type(request).__name__})


urlpatterns = [
    path("admin/", admin.site.urls),
    path("over/", over),
]
