"""Worker (run under torchrun): the lens bench (compare_lenses with its causal check) on 2 gloo processes."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import TEXT, save  # noqa: E402

SCORES = ("kl_final_layer", "kl_layer_final", "cross_entropy", "top1_agreement", "calibration",
          "calibration_bins", "causal_lens", "causal_random", "causal_win")


def lens_bench_case(group=None) -> dict[str, torch.Tensor]:
    """compare_lenses of the embedded model on TEXT (5 batches: 3 + 2; 5 causal positions: 3 + 2)."""
    import reslens
    from reslens.lens import compare_lenses

    model, tokenizer = reslens.load_model()
    scope = reslens.lens.Patchscope(model, "token_identity", tokenizer=tokenizer)
    scores = compare_lenses(model, [TEXT], [None, scope], tokenizer=tokenizer, max_length=24, batch_size=4,
                            max_tokens=200, causal_positions=5, progress=False, group=group)
    out = {name: getattr(scores, name) for name in SCORES}
    out["n_tokens"] = torch.tensor(scores.n_tokens)
    out["causal_positions"] = torch.tensor(scores.causal_positions)
    return out


if __name__ == "__main__":
    dist.init_process_group("gloo")
    save(lens_bench_case(), sys.argv[1], dist.get_rank())
    dist.barrier()  # leave together: a rank closing while the other still talks can abort it
    dist.destroy_process_group()
