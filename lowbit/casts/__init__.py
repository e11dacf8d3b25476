"""Input casts: what a sender does to its partial before quantizing (``lowbit.casts.base``)."""
from lowbit.casts.base import CASTS, Cast, NoCast  # noqa: F401 - the public names
