"""Files that are not weights or checkpoints, as users meet them (a failed download, a git-lfs
pointer, an archive, a cut-off copy), with the message lit-ft must give for each."""

from __future__ import annotations

import gzip
import io
import zipfile

import timm
import torch
from safetensors.torch import save


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=7).state_dict()


HTML = "<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
LFS = "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146e8f4ab5e1e3b0c1c2e\nsize 21444401\n"


def torch_bytes(legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(_state_dict(), buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def safetensors_bytes() -> bytes:
    return save({k: v.contiguous() for k, v in _state_dict().items()})


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("weights.npy", b"\x93NUMPY")
        z.writestr("README.txt", "hi")
    return buf.getvalue()


def _gzip_bytes() -> bytes:
    return gzip.compress(torch_bytes())


# name -> (file content, what the message must say)
BAD_FILES = {
    "text": (b"these are not the weights you are looking for\n", "is not a PyTorch/safetensors file: it starts with 'these are not the weights you are lookin...' (a text file)"),
    "html": (HTML.encode(), "is not a PyTorch/safetensors file: it starts with '<!DOCTYPE html' (an HTML page: the download probably failed)"),
    "git-lfs": (LFS.encode(), "is not a PyTorch/safetensors file: it is a git-lfs pointer (version https://git-lfs.github.com/spec/v1)"),
    "zip": (_zip_bytes(), "is not a PyTorch/safetensors file: it is a zip archive of weights.npy, README.txt"),
    "gzip": (_gzip_bytes(), "is not a PyTorch/safetensors file: it is gzip-compressed"),
    "binary": (bytes(range(7, 200)), "is not a PyTorch/safetensors file: it starts with the bytes b'\\x07\\x08\\t"),
    "empty": (b"", "is empty (0 bytes)"),
    "truncated-zip": (torch_bytes()[:3000], "is truncated: it ends early (3000 bytes)"),
    "truncated-legacy": (torch_bytes(legacy=True)[:3000], "is truncated: it ends early (3000 bytes)"),
    "truncated-safetensors": (safetensors_bytes()[:3000], "is truncated: it ends early (3000 bytes)"),
}
HINTS = {
    "git-lfs": "git lfs pull",
    "html": "download the file itself, not the web page",
    "zip": "unzip it",
    "gzip": "decompress it first",
    "empty": "fetch the file again",
}
