"""The demo: a tiny GPT and a tiny LLaMA trained in 3D-parallel style on a laptop, offline.

    python -m minimegatron.demo                 # or: make demo      (about two minutes on 2 CPU cores)
    python -m minimegatron.demo --quick         # every step in seconds
    python -m minimegatron.demo --hidden-size 192 --num-layers 4 --steps 300 --tp 2 --pp 2 --dp 2

Five steps, each a call into the package (nothing here re-implements it):

    1  data       Python's standard library (no download) -> one sentencepiece tokenizer for both
                  models -> Megatron .bin/.idx                       minimegatron.data   (demo/data.py)
    2  train      GPT, then LLaMA: same sizes, same data, same steps, on TP=2 x PP=2 simulated ranks
                  (forked gloo processes, DeepSpeed's pipeline engine), eval on the valid split, a
                  checkpoint of full weights at the end                minimegatron.training
    3  compare    the GPT -> LLaMA porting points and a table: parameters (closed form and
                  counted), train / valid loss, tokens/s, wall time   (demo/report.py)
    4  plot       loss_curves.png: train and valid loss of both models in one figure
    5  sample     each checkpoint loaded as a plain TP=1 model; greedy and top-p text from "def ",
                  "import ", "class "                                 minimegatron.generate (demo/samples.py)

Output (``--out``, default ``demo_out/``)::

    tokenizer.model  data.bin  data.idx  data.json (cache manifest: a rerun reuses them)
    gpt/  llama/     config.json, train_log.jsonl, loss.png, checkpoint/ (iter_*/model.safetensors)
    loss_curves.png  samples.txt  summary.json

Modules: :mod:`.cli` (options, checks, the steps in order), :mod:`.data`, :mod:`.report`, :mod:`.samples`.
"""
from minimegatron.demo.cli import DemoConfig, main, parse_args

__all__ = ["DemoConfig", "main", "parse_args"]
