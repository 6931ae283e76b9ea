import numpy

from engine.core.packages import installed_version


def test_installed_version_from_metadata_and_none_when_absent():
    assert installed_version("numpy") == numpy.__version__
    assert installed_version("no-such-distribution-quantdeck") is None
