"""Side by side with what users would pick instead: lit-ft's README recipe vs Lightning's
BackboneFinetuning, fastai's fine_tune and a plain timm + PyTorch loop (``python -m benchmarks.peers``).

One file per peer (``lit_ft_cli.py``, ``lightning_bf.py``, ``fastai_ft.py``, ``timm_loop.py``), the
shared data (``data.py``), the probe that measures inside each run (``probe.py``), the runner
(``runner.py``) and the report (``summary.py``).
"""
