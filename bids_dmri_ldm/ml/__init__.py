"""Networks, diffusion maths, bundles, training and inference (PyTorch + MONAI; no BIDS, no nipype)."""
import getpass as _getpass
import os as _os


def _ensure_user_name() -> None:
    """Give the process a user name when its UID has no passwd entry.

    MONAI calls ``getpass.getuser()`` when it is imported (``monai.config.deviceconfig``), which
    raises ``KeyError`` for a UID unknown to ``/etc/passwd`` -- the normal case of
    ``docker run -u 4242`` and of some HPC containers.  ``getuser`` reads ``$USER`` first, so a
    name derived from the UID is set when (and only when) none can be found.
    """
    try:
        _getpass.getuser()
    except (KeyError, OSError):
        _os.environ["USER"] = f"uid{_os.getuid()}"


_ensure_user_name()
