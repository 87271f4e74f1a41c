"""2-process DDP (gloo, CPU) fit with Grad-CAM panels every epoch; each rank leaves a marker.

Run by tests/test_cam.py as `python tests/ddp_cam_run.py OUT_DIR`; Lightning's launcher starts
the second rank by re-running this script. Only rank zero may compute and log panels, and
neither rank may wait on the other for it (the CAM pass has no collective).
"""

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_ft.callbacks import GradCAMLogger  # noqa: E402
from tests.helpers import tiny_data, tiny_model, trainer as make_trainer  # noqa: E402


def main(out: Path) -> None:
    L.seed_everything(0)
    cam = GradCAMLogger(every_n_epochs=1, num_images=4, target_layer="layer3")
    trainer = make_trainer(out, devices=2, strategy="ddp", max_epochs=2, deterministic=False, callbacks=[cam],
                           logger=TensorBoardLogger(str(out), name="cam"))
    trainer.fit(tiny_model(head_init="normal"), tiny_data())
    (out / f"rank{trainer.global_rank}.done").write_text("ok")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
