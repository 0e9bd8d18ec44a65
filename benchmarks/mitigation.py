"""Cost of each mitigation, as ratios against no mitigation in the same process.

Compute-side (clipping, ABFT): inference time of DCN and DLRM on a batch of 4096 with the
mitigation attached vs none: each round times every setup, back to back, then again in reverse
order, and the ratio reported is the median over runs of each run's time / the unmitigated time at
the same position of its round (paired and ABBA-ordered, so the machine's speed drifting, common on
shared VMs, cancels out). Run it a few times: a 2-core VM still moves single ratios by ~0.1.
Memory-side (selective bit protection, ECC): their storage overhead, and the time of
inject + restore with the protection vs without at a given BER (the emulation cost; real
hardware pays only the storage).

    python benchmarks/mitigation.py [--repeats 50] [--batch 4096] [--threads 1] [--torchrec]

``--torchrec`` adds TorchRec's DLRM (``dlrm-torchrec``, KeyedJaggedTensor batches) with float tables
and with int8 rows (``pytei quantize``'s conversion), where ABFT checks the quantized rows' checksums.
After the ratios, each model's ``ABFT.plan`` summary: layers checked / unchecked and memory-,
compute-bound or ambiguous on this machine's measured roofline.

Targets (issue 16): ABFT <= 1.10x, clipping <= 1.03x.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import pytei
from pytei import models
from pytei.bits import layout
from pytei.mitigation import ABFT, ECC, ClipActivations, ProtectBits, mitigate
from pytei.mitigation.abft import SCHEMES

#: Benchmarked models: pytorch-fm's DCN as the paper trains it, DLRM with the zoo's small default MLPs,
#: and DLRM in the reference Criteo Kaggle architecture (facebookresearch/dlrm,
#: dlrm_s_criteo_kaggle.sh: bottom 13-512-256-64-16, top 512-256-1), where MLPs carry more of the work.
MODELS = {
    "dcn": ("dcn", {}),
    "dlrm": ("dlrm", {}),
    "dlrm-kaggle": ("dlrm", {"bottom_mlp": (512, 256, 64, 16), "top_mlp": (512, 256)}),
}


def make(key: str, batch: int, gen: torch.Generator):
    """A model with Criteo-like inputs (26 categorical fields of 1000 values; DLRM adds 13 dense)."""
    name, config = MODELS[key]
    fields = [1000] * 26
    if key.startswith("dlrm-torchrec"):
        from pytei.data.kjt import default_keys, to_kjt

        torch.manual_seed(0)  # the same weights for every batch drawn
        model = models.create("dlrm-torchrec", field_dims=fields, dense_dim=13).eval()
        if key.endswith("int8"):
            from pytei.torchrec.quantize import quantize

            model = quantize(model, "int8").eval()
        ids = torch.randint(0, 1000, (batch, 26), generator=gen)
        return model, (torch.randn(batch, 13, generator=gen), to_kjt(ids, default_keys(26)))
    if name == "dlrm":
        model = models.create("dlrm", field_dims=fields, dense_dim=13, **config).eval()
        inputs = (torch.randn(batch, 13, generator=gen), torch.randint(0, 1000, (batch, 26), generator=gen))
    else:
        model = models.create(name, field_dims=fields, **config).eval()
        inputs = (torch.randint(0, 1000, (batch, 26), generator=gen),)
    return model, inputs


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


@torch.no_grad()
def inference_ratios(name: str, batch: int, repeats: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    model, inputs = make(name, batch, gen)
    calib = [make(name, batch, gen)[1] for _ in range(4)]
    abfts = {}
    for scheme in SCHEMES:  # auto chooses each layer's scheme on the first calibration batch
        abfts[scheme] = ABFT(scheme=scheme)
        abfts[scheme].calibrate(model, calib)
    setups = {
        "none": (),
        "clip": (ClipActivations(),),
        "clip-zero": (ClipActivations(mode="zero"),),
        **{f"abft-{scheme}": (abft,) for scheme, abft in abfts.items()},
    }
    times: dict[str, list[float]] = {k: [] for k in setups}
    for _ in range(3):  # warm-up
        model(*inputs)
    order = list(setups)
    for _ in range(repeats):  # each round: every setup, then again in reverse (ABBA cancels drift)
        for key in order + order[::-1]:
            with mitigate(model, *setups[key]):
                times[key] += timed(lambda: model(*inputs), 1)
    base = times["none"]
    ratios = {k: statistics.median(t / b for t, b in zip(v, base, strict=True)) for k, v in times.items()}
    chosen = list(abfts["auto"].schemes.values())
    auto_fused = f"{chosen.count('fused')}/{len(chosen)}"
    return ratios | {"none_ms": statistics.median(base) * 1e3, "auto_fused": auto_fused}


def protection_costs(ber: float, repeats: int) -> dict[str, tuple[float, float]]:
    model = torch.nn.Sequential(torch.nn.Embedding(250_000, 16), torch.nn.Linear(16, 64))  # ~4M parameters
    lay = layout(torch.float32)
    out = {}
    base = None
    for key, protect in (("none", None), ("protect-bits", ProtectBits()), ("ecc", ECC())):

        def trial(protect=protect):
            inj = pytei.Injector(pytei.BitFlip(ber), seed=1, protect=protect)
            inj.apply(model)
            inj.restore()

        trial()
        t = statistics.median(timed(trial, repeats))
        base = base or t
        out[key] = (protect.overhead(lay) if protect else 0.0, t / base)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--ber", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    parser.add_argument("--torchrec", action="store_true", help="add dlrm-torchrec, float and int8")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.torchrec:
        MODELS["dlrm-torchrec"] = ("dlrm-torchrec", {})
        MODELS["dlrm-torchrec-int8"] = ("dlrm-torchrec", {})
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    print(f"inference, batch {args.batch}, median of {args.repeats} paired rounds, {threads} threads")
    print(f"{'model':>18} {'none ms':>9} {'clip':>7} {'clip-zero':>10}", end="")
    print(f" {'abft global':>12} {'abft fused':>11} {'abft auto':>10} {'auto: fused layers':>19}")
    for name in MODELS:
        r = inference_ratios(name, args.batch, args.repeats)
        cells = f"{r['clip']:>6.3f}x {r['clip-zero']:>9.3f}x"
        abft = f"{r['abft-global']:>11.3f}x {r['abft-fused']:>10.3f}x {r['abft-auto']:>9.3f}x"
        print(f"{name:>18} {r['none_ms']:>9.2f} {cells} {abft} {r['auto_fused']:>19}")
    print("\nABFT.plan: parameterised layers checked / unchecked; checked layers by roofline bound")
    for name in MODELS:
        model, inputs = make(name, args.batch, torch.Generator().manual_seed(0))
        plan = ABFT().plan(model, inputs, repeats=3)
        called = plan[plan["layer_ms"].notna()]
        bounds = ", ".join(f"{k} {v}" for k, v in called["bound"].value_counts().items())
        unchecked = plan[plan["status"] == "unchecked"]
        checked = int((plan["status"] == "checked").sum())
        print(f"{name:>18} checked {checked}, unchecked {len(unchecked)}; {bounds}")
        for _, row in unchecked.iterrows():
            print(f"{'':>18}   unchecked {row['layer']} ({row['type']}): {row['reason']}")
    print(f"\nmemory-side protections, ~4M float32 parameters, BitFlip({args.ber:g}) inject + restore")
    print(f"{'protection':>13} {'storage overhead':>17} {'emulation time':>15}")
    for key, (overhead, ratio) in protection_costs(args.ber, max(5, args.repeats // 3)).items():
        print(f"{key:>13} {overhead:>16.1%} {ratio:>14.2f}x")


if __name__ == "__main__":
    main()
