"""Both engines on a real tiny MoE checkpoint: log-probs agree with transformers, before and
after weight updates (vLLM's CPU fused-MoE needs a repack after a reload)."""

import threading

import pytest
import torch

from workers.rollout import Rollout, contiguous_chunks
from zaya_rl.models import load_model, weights_for_transport

PROMPTS = ["12+3=?\n", "4-5+6=?\n", "7+8=?\n"]


def learner_logprobs(model, completion):
    ids = torch.tensor([completion.prompt_ids + completion.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    start = len(completion.prompt_ids) - 1
    targets = torch.tensor(completion.token_ids)[:, None]
    return logp[start:start + len(completion.token_ids)].gather(-1, targets)[:, 0]


def mean_abs_diff(rollout, model):
    groups = rollout.generate(PROMPTS, n=4, temperature=1.0, max_tokens=16, seed=1)
    assert len(groups) == len(PROMPTS) and all(len(g) == 4 for g in groups)
    diffs = [(learner_logprobs(model, c) - torch.tensor(c.logprobs)).abs().mean().item()
             for g in groups for c in g]
    return sum(diffs) / len(diffs)


@pytest.fixture(scope="module", params=["vllm", "hf"])
def rollout(request, tiny_checkpoint):
    return Rollout(request.param, str(tiny_checkpoint), seed=0, max_model_len=128, torch_threads=2)


def test_logprobs_match_transformers_across_weight_updates(rollout, tiny_checkpoint):
    model = load_model(tiny_checkpoint).eval()
    weights_a = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    weights_b = {k: v + 0.05 * torch.randn_like(v) for k, v in weights_a.items()}
    # The controller sends numpy arrays, which arrive read-only from Ray's object store.
    arrays_b = weights_for_transport(weights_b)
    for array in arrays_b.values():
        array.setflags(write=False)
    assert mean_abs_diff(rollout, model) < 1e-4
    for version, (weights, sent) in enumerate([(weights_b, weights_b), (weights_a, weights_a), (weights_b, arrays_b),
                                               (weights_a, weights_a)], start=1):
        model.load_state_dict(weights)
        assert rollout.load_weights(sent, version) == version
        assert mean_abs_diff(rollout, model) < 1e-4
        # Each sample names the weights that made it (the controller's check for a restarted engine).
        samples = rollout.generate(PROMPTS[:1], n=2, temperature=1.0, max_tokens=4)
        assert {c.weight_versions for group in samples for c in group} == {(version, version)}


def test_greedy_is_deterministic_and_reports_finish(rollout):
    a = rollout.generate(PROMPTS, n=1, temperature=0.0, max_tokens=12)
    b = rollout.generate(PROMPTS, n=1, temperature=0.0, max_tokens=12)
    assert [g[0].token_ids for g in a] == [g[0].token_ids for g in b]
    for group in a:
        c = group[0]
        assert len(c.token_ids) == len(c.logprobs) <= 12
        assert c.finished == (len(c.token_ids) < 12 or c.token_ids[-1] == rollout.engine.tokenizer.eos_token_id)


def test_contiguous_chunks_cover_the_items_in_order():
    """How a batch is spread over the engines: at most one chunk per engine, joined back in order."""
    items = list(range(7))
    assert contiguous_chunks(items, 3) == [(0, [0, 1, 2]), (3, [3, 4, 5]), (6, [6])]
    assert contiguous_chunks(items, 1) == [(0, items)]
    assert contiguous_chunks(items[:2], 4) == [(0, [0]), (1, [1])]  # fewer items than engines
    assert contiguous_chunks([], 2) == []
    for parts in range(1, 9):
        chunks = contiguous_chunks(items, parts)
        assert len(chunks) <= parts and [x for _, chunk in chunks for x in chunk] == items
        assert all(items[start] == chunk[0] for start, chunk in chunks)


def test_unknown_engine_is_rejected(tiny_checkpoint):
    with pytest.raises(ValueError, match="unknown rollout engine"):
        Rollout("nope", str(tiny_checkpoint))


def test_vllm_texts_equal_vllms_own_detokenization(tiny_checkpoint):
    """The engine decodes texts once after generation; they must be what vLLM's incremental
    detokenizer gives for the same samples."""
    from vllm import SamplingParams

    rollout = Rollout("vllm", str(tiny_checkpoint), seed=0, max_model_len=128, torch_threads=2)
    ours = rollout.generate(PROMPTS, n=4, temperature=1.0, max_tokens=24, seed=7)
    params = [SamplingParams(n=4, temperature=1.0, max_tokens=24, logprobs=0, seed=7 + i) for i in range(len(PROMPTS))]
    theirs = rollout.engine.llm.generate(PROMPTS, params, use_tqdm=False)
    pairs = [(c, o) for group, out in zip(ours, theirs) for c, o in zip(group, out.outputs)]
    assert all(c.token_ids == list(o.token_ids) for c, o in pairs)  # the same samples
    assert [c.text for c, _ in pairs] == [o.text for _, o in pairs]
    assert any(c.text for c, _ in pairs)
    # A seed seeds each prompt apart: one problem asked 8 times gets 8 draws, not one draw 8 times.
    same = rollout.generate(PROMPTS[:1] * 8, n=1, temperature=1.0, max_tokens=24, seed=7)
    assert len({tuple(g[0].token_ids) for g in same}) > 1


def test_weights_loaded_beside_a_generation_go_in_between_its_decode_steps(tiny_checkpoint):
    """Partial rollouts: weights loaded from another thread while a generation is in flight go
    in between two of its decode steps. A sample's tokens before the switch carry the old
    weights' log-probs; those after differ from them (the new weights, over a cache the old ones
    made). The prefix cache holds no block of the old weights for the next generation."""
    rollout = Rollout("vllm", str(tiny_checkpoint), seed=0, max_model_len=128, torch_threads=2)
    model = load_model(tiny_checkpoint).eval()
    torch.manual_seed(1)
    weights_b = {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}
    engine = rollout.engine
    step, ten_steps_done = engine.llm.llm_engine.step, threading.Event()
    steps = []

    def counted_step():  # the engine's own step; the count tells the loader when to load
        outputs = step()
        steps.append(1)
        if len(steps) == 10:
            ten_steps_done.set()
        return outputs

    engine.llm.llm_engine.step = counted_step
    loader = threading.Thread(target=lambda: ten_steps_done.wait() and rollout.load_weights(weights_b, 1, True))
    loader.start()
    groups = rollout.generate(PROMPTS, n=4, temperature=1.0, max_tokens=100, seed=3)
    loader.join()
    spanning = 0
    for completion in (c for group in groups for c in group):
        off_a = (learner_logprobs(model, completion) - torch.tensor(completion.logprobs)).abs()
        switch = int((off_a >= 1e-4).float().argmax()) if bool((off_a >= 1e-4).any()) else len(off_a)
        if completion.weight_versions == (0, 1):
            spanning += 1
            # The old weights' log-probs up to the switch, other weights' after it (an odd token
            # may land near the old value by chance: the median says where the suffix stands).
            assert 5 <= switch < len(off_a) and float(off_a[switch:].median()) > 1e-2, off_a
        else:
            assert completion.weight_versions == (0, 0) and switch == len(off_a) < 10, off_a
    assert spanning > 0
    model.load_state_dict(weights_b)
    assert rollout.version() == 1 and mean_abs_diff(rollout, model) < 1e-4
    after = rollout.generate(PROMPTS, n=1, temperature=1.0, max_tokens=8, seed=3)
    assert all(c.weight_versions == (1, 1) for group in after for c in group)
