"""URLs of the example Django project."""

from __future__ import annotations

from django.urls import path  # type: ignore[import-untyped]

from . import views

urlpatterns = [
    path("", views.home),
    path("whoami", views.whoami),
]
