"""MONAI needs a user name at import; a UID without a passwd entry (docker run -u 4242) gets one."""
import getpass
import os
import pwd

from bids_dmri_ldm import ml


def test_a_uid_without_passwd_entry_gets_a_user_name(monkeypatch):
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(name, raising=False)

    def unknown(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", unknown)
    try:
        getpass.getuser()
        raise AssertionError("getuser() should fail without a passwd entry and USER")
    except (KeyError, OSError):
        pass
    ml._ensure_user_name()
    assert getpass.getuser() == f"uid{os.getuid()}"


def test_an_existing_user_name_is_kept(monkeypatch):
    monkeypatch.setenv("USER", "alice")
    ml._ensure_user_name()
    assert os.environ["USER"] == "alice"
