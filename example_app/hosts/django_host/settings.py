"""Settings of the example Django project: no database, no apps, one middleware of its own.

:func:`example_app.hosts.django_host.asgi.configure_django` applies them with
``settings.configure`` unless Django is already configured (or ``DJANGO_SETTINGS_MODULE`` is set);
the module also works as ``DJANGO_SETTINGS_MODULE=example_app.hosts.django_host.settings``.
"""

from __future__ import annotations

from typing import Any

SECRET_KEY = "example-only-not-secret"  # a loopback demo: no sessions, no forms
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
ROOT_URLCONF = "example_app.hosts.django_host.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE = ["example_app.hosts.django_host.middleware.host_header"]
DATABASES: dict[str, Any] = {}
TEMPLATES: list[dict[str, Any]] = []
USE_TZ = True
