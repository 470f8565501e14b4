"""pytest: the peer scripts are standalone programs (run by their own interpreters in subprocesses);
import them only as scripts, never during doctest collection."""

collect_ignore = ["peers/openreml_peer.py", "peers/statsmodels_peer.py", "peers/make_patched_openreml.py"]
