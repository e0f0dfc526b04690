"""Host memory of sharding a model for FSDP: domaintune's ``train.fsdp.shard`` against the plain
recipe (``copy.deepcopy`` of the model, then ``fully_shard``), measured in the same script.

Each variant runs in its own group of N processes (gloo, CPU) on a randomly initialised Llama of
the size asked for; every process builds the whole model first, as a ``domaintune run`` under
torchrun does. The table shows how much a process's RSS grew at its peak while the sharded copy
was made, and while the trained weights were gathered back into the whole model (all of them:
full fine-tuning). The plain way back is ``get_model_state_dict(full_state_dict=True)`` and
``load_state_dict``.

    python bench/fsdp_memory.py [--processes 2] [--hidden 1024] [--layers 16]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import threading

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakRss:
    """The highest RSS seen while inside (sampled every millisecond): ru_maxrss would also count
    the peak of building the model before."""

    def __enter__(self):
        self.peak, self._done = _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _plain_shard(model, layers):
    from torch.distributed.fsdp import fully_shard

    positions = {id(m): i for i, m in enumerate(model.modules())}
    sharded = copy.deepcopy(model)
    modules = list(sharded.modules())
    for layer in layers:
        fully_shard(modules[positions[id(layer)]])
    return fully_shard(sharded)


def _plain_gather_into(model, sharded) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model.load_state_dict(get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True)))


def _worker(rank: int, world: int, variant: str, args: dict, out: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from domaintune.train import fsdp

    torch.set_num_threads(1)
    # a file, not a port: nothing else on the machine can take it between choosing and binding
    dist.init_process_group("gloo", init_method=f"file://{out}/{variant}.rendezvous", rank=rank, world_size=world)
    config = LlamaConfig(hidden_size=args["hidden"], intermediate_size=args["hidden"] * 11 // 4,
                         num_hidden_layers=args["layers"], num_attention_heads=16, num_key_value_heads=8,
                         vocab_size=32000, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    layers = list(model.model.layers)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    before = _rss_mb()
    with _PeakRss() as rss:
        sharded = _plain_shard(model, layers) if variant == "plain" else fsdp.shard(model, layers, "cpu")
    # the shards must hold the model's weights either way
    probe = dict(sharded.named_parameters())["model.layers.0.mlp.up_proj.weight"].full_tensor()
    assert torch.equal(probe, model.model.layers[0].mlp.up_proj.weight)
    shard_growth = rss.peak - before
    before = _rss_mb()
    with _PeakRss() as rss:  # the trained weights back into the whole model
        _plain_gather_into(model, sharded) if variant == "plain" else fsdp.gather_into(model, sharded)
    with open(f"{out}/{variant}-{rank}.json", "w") as f:
        json.dump({"model_mb": model_mb, "shard_growth_mb": shard_growth, "gather_growth_mb": rss.peak - before}, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for variant in ("plain", "domaintune"):
            mp.spawn(_worker, args=(args.processes, variant, vars(args), out), nprocs=args.processes)
            results = [json.load(open(f"{out}/{variant}-{r}.json")) for r in range(args.processes)]
            rows[variant] = {key: max(r[key] for r in results) for key in results[0]}
    print(f"{args.processes} processes, Llama hidden {args.hidden} x {args.layers} layers, "
          f"{rows['plain']['model_mb']:.0f} MB of float32 weights, torch {torch.__version__}")
    print("peak RSS growth per process, MB (the most of any process):")
    print(f"{'variant':<12} {'sharding':>10} {'gathering back':>15}")
    for variant, row in rows.items():
        print(f"{variant:<12} {row['shard_growth_mb']:>10.0f} {row['gather_growth_mb']:>15.0f}")
    for key, what in (("shard_growth_mb", "sharding"), ("gather_growth_mb", "gathering back")):
        ratio = rows["domaintune"][key] / max(1.0, rows["plain"][key])
        print(f"{what}: domaintune/plain {ratio:.2f}")


if __name__ == "__main__":
    sys.exit(main())
