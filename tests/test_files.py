"""Outputs appear whole or not at all (`stable_diffusion/files.py`): written under a temporary name,
renamed into place; on failure nothing partial is left and an earlier output is kept."""
import pytest

from stable_diffusion.files import check_writable, staged


def test_file_appears_only_when_complete(tmp_path):
    target = tmp_path / "out.png"
    with staged(target) as temporary:
        temporary.write_bytes(b"half")
        assert not target.exists() and temporary.parent == tmp_path and temporary.name.startswith(".out.png.")
        temporary.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == ["out.png"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failure_leaves_no_partial_file_and_keeps_the_old_one(error, tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    with pytest.raises(type(error)):
        with staged(target, overwrite=True) as temporary:
            temporary.write_bytes(b"trunc")
            raise error
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_existing_output_refused_before_and_after(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="out.png exists; pass overwrite=True"):
        with staged(target):
            pytest.fail("the block ran")
    target.unlink()
    with pytest.raises(FileExistsError):
        with staged(target) as temporary:
            temporary.write_bytes(b"new")
            target.write_bytes(b"appeared meanwhile")
    assert target.read_bytes() == b"appeared meanwhile" and [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_folder_replaces_folder(tmp_path):
    target = tmp_path / "bundle"
    (target / "old").mkdir(parents=True)
    with staged(target, overwrite=True) as temporary:
        (temporary / "new").mkdir(parents=True)
    assert [p.name for p in target.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["bundle"]


@pytest.mark.parametrize("path, error, message", [
    ("{tmp}/folder.png", IsADirectoryError, "folder.png is a folder"),
    ("/proc/x.png", FileNotFoundError, "cannot write in the folder of /proc/x.png"),
    ("/sys/x.png", PermissionError, "cannot write in the folder of /sys/x.png: Permission denied"),
])
def test_check_writable(path, error, message, tmp_path):
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(error, match=message):
        check_writable(path.format(tmp=tmp_path))
    check_writable(tmp_path / "new.png")
    assert [p.name for p in tmp_path.iterdir()] == ["folder.png"]
