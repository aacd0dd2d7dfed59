"""gs:// goes through gcsfs like s3:// through s3fs. No GCS server is reachable here: this
checks the wiring (filesystem class, WebDataset opener), not transfers."""
from __future__ import annotations

import fsspec
import pytest

from ldm_train.data import fsspec_io


@pytest.mark.parametrize("scheme", ["gs", "s3", "memory"])
def test_object_store_schemes_are_registered_for_webdataset(scheme: str) -> None:
    import importlib

    fsspec_io.register_fsspec_schemes()
    gopen = importlib.import_module("webdataset.gopen")  # the module (the package attribute is the function)
    assert scheme in gopen.gopen_schemes


def test_gs_urls_resolve_to_gcsfs_without_network() -> None:
    pytest.importorskip("gcsfs")
    fs, path = fsspec.core.url_to_fs("gs://bucket/latents/shard-000000.tar", token="anon")
    assert type(fs).__module__.startswith("gcsfs") and path == "bucket/latents/shard-000000.tar"
    assert fsspec_io.protocol_of("gs://bucket/x") in ("gs", "gcs")
    assert not fsspec_io.is_local("gs://bucket/x")
