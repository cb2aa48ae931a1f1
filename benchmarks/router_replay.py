"""How far apart are the engine's and the learner's log-probs, with and without router replay?

    python -m benchmarks.router_replay [--checkpoint DIR] [--out benchmarks/results]

vLLM (in-process, returning the experts it routed each token to) samples 4 completions of
64 held-out chain-sum prompts at T = 1, up to 64 tokens; the learner's forward path
(`collate`, `replay_routing`, `completion_logprobs` on the transformers model as
`prepare_policy` sets it up) then scores the same tokens, routing by itself and replaying
the engine's experts. In fp32 and in bf16 (both sides in the same dtype; the DeepSpeed
learner's bf16 keeps the module in bf16 too). Reported per dtype and mode: mean and max
|engine − learner| log-prob over completion tokens, and the share of (token, layer) pairs
and of tokens (any layer) whose top-k experts differ between the engine's choice and the
learner's own; with replay the learner uses the engine's, so its routing differs nowhere.

Always on the untrained tiny MoE of recipes/tiny.yaml (seed 0); `--checkpoint` adds a trained
one (e.g. a run's `final`). Prints a table and writes router_replay.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from workers.learner import Sequence, collate, completion_logprobs, prepare_policy
from workers.rollout import VllmEngine
from zaya_rl.models import build_checkpoint, load_model
from zaya_rl.recipe import load_recipe
from zaya_rl.router_replay import replay_routing, routing_mismatch
from zaya_rl.tasks import TaskStream

NUM_PROMPTS, SAMPLES, MAX_TOKENS, CHUNK = 64, 4, 64, 32


def learner_pass(model, completions, replay: bool) -> dict:
    """Sums over the completions, scored by the learner's forward path in chunks."""
    diffs, pairs_differ, pairs, tokens_differ, tokens = [], 0.0, 0, 0, 0
    for i in range(0, len(completions), CHUNK):
        chunk = completions[i:i + CHUNK]
        batch = [Sequence(c.prompt_ids, c.token_ids, routed_experts=c.routed_experts) for c in chunk]
        t = collate(batch, pad_id=0, device=torch.device("cpu"))
        with replay_routing(model, t.routed_experts if replay else None), torch.no_grad():
            out = model(input_ids=t.input_ids, attention_mask=t.attention_mask, output_router_logits=True,
                        use_cache=False)
        logprobs = completion_logprobs(out.logits, t)
        for row, c in zip(logprobs, chunk):
            diffs.append((row[:len(c.token_ids)] - torch.tensor(c.logprobs)).abs())
        routed = (t.routed_experts >= 0).all(-1).all(-1)
        num = int(routed.sum())
        pairs_differ += routing_mismatch(out.router_logits, t.routed_experts) * num * t.routed_experts.shape[1]
        pairs += num * t.routed_experts.shape[1]
        own = torch.stack([layer.topk(t.routed_experts.shape[-1], -1).indices for layer in out.router_logits], 1)
        differs = (own.sort(-1).values != t.routed_experts.sort(-1).values).any(-1).any(-1)
        tokens_differ += int(differs[routed].sum())
        tokens += num
    diff = torch.cat(diffs)
    return {"mean_abs_logprob_diff": float(diff.mean()), "max_abs_logprob_diff": float(diff.max()),
            "own_routing_differs_pairs": pairs_differ / pairs, "own_routing_differs_tokens": tokens_differ / tokens,
            "used_routing_differs_pairs": 0.0 if replay else pairs_differ / pairs,
            "completion_tokens": int(diff.numel()), "routed_tokens": tokens}


def measure(checkpoint: Path, dtype: str, prompts: list[str]) -> list[dict]:
    engine = VllmEngine(str(checkpoint), seed=0, max_model_len=512, torch_threads=2,
                        return_routed_experts=True, dtype=dtype)
    completions = [c for g in engine.generate(prompts, SAMPLES, 1.0, MAX_TOKENS, seed=0) for c in g]
    del engine
    model = prepare_policy(load_model(checkpoint)).to(getattr(torch, dtype))
    return [{"dtype": dtype, "replay": replay, **learner_pass(model, completions, replay)} for replay in (False, True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, action="append", default=[],
                        help="also measure this checkpoint (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    prompts = [t.prompt for t in TaskStream("chain_sum", 12345).take(1, NUM_PROMPTS)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe("recipes/tiny.yaml")
        stream = TaskStream("chain_sum", recipe.seed)
        corpus = [t.prompt + t.solution for level in range(recipe.tasks.max_level + 1)
                  for t in stream.take(level, 500)]
        untrained = build_checkpoint(recipe.model.tiny, corpus, Path(tmp) / "tiny", recipe.seed)
        for name, checkpoint in [("untrained tiny", untrained)] + [(str(c), c) for c in args.checkpoint]:
            rows += [{"checkpoint": name, **row} for dtype in ("float32", "bfloat16")
                     for row in measure(checkpoint, dtype, prompts)]
    print(f"{NUM_PROMPTS} prompts x {SAMPLES} samples, T=1, <= {MAX_TOKENS} tokens; routing differs: the "
          "engine's top-k against the learner's own")
    print("| checkpoint | dtype | replay | mean abs logprob diff | max | routing differs (token, layer) "
          "| (token) | learner routes differently |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['checkpoint']} | {r['dtype']} | {'on' if r['replay'] else 'off'} | "
              f"{r['mean_abs_logprob_diff']:.2e} | {r['max_abs_logprob_diff']:.2e} | "
              f"{r['own_routing_differs_pairs']:.4f} | {r['own_routing_differs_tokens']:.4f} | "
              f"{r['used_routing_differs_pairs']:.4f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "router_replay.json").write_text(json.dumps(
        {"prompts": NUM_PROMPTS, "samples": SAMPLES, "max_tokens": MAX_TOKENS, "temperature": 1.0,
         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
