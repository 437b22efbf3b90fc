"""A view that answers how Django sees the request, and one that redirects to a named URL."""

from django.http import JsonResponse
from django.shortcuts import redirect
from django.urls import path, reverse


def where(request):
    return JsonResponse(
        {
            "over": type(request).__name__,
            "path": request.path,
            "path_info": request.path_info,
            "reverse": reverse("where"),
        }
    )


def go(request):
    return redirect("where")


urlpatterns = [
    path("where/", where, name="where"),
    path("go/", go),
]
