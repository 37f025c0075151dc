"""Model loading (hub id, local directory or file, or ``tiny``) for every network the method uses."""

from stages.models import quiet as _quiet

_quiet.install()
