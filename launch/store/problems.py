"""Why a stored artifact cannot be shown: the expected conditions, named, for the pages to explain.

A page catches ``StoreProblem`` (and only it) and says in words what happened and what to do;
any other exception is a bug and propagates (the page tests fail on it).

    try:
        cal = store.load_calibration(folder)
    except store.StoreProblem as problem:
        st.warning(f"This calibration cannot be shown: {problem}")
"""
from __future__ import annotations


class StoreProblem(Exception):
    """An expected reason the store cannot give a page what it asked for; the message says it in
    words and names the remedy."""


class ArtifactMissing(StoreProblem):
    """A file the view needs is not there (never written, or removed since the run was listed)."""


class ArtifactOutdated(StoreProblem):
    """The artifact was written by an older version and lacks a part this view needs."""


class ArtifactDamaged(StoreProblem):
    """The artifact's files are there but cannot be read (a torn or foreign file)."""
