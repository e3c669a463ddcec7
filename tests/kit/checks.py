"""Checks whose failure messages explain themselves: tensors within a tolerance (the worst entry named), a user
error as one line and exit code 2, the lines a command said, the traces an offload leaves on the CPU, and a
model's cached decoding and greedy generation against its full forward and transformers'.
"""

import re

import torch
import torch.nn as nn


# where the offload tests send the blocks: the CPU everywhere (only the moves can be seen), CUDA where present
OFFLOAD_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def assert_close(ours, ref, atol, what):
    diff = (ours.float() - ref.float()).abs()
    worst = diff.flatten().argmax().item()
    assert diff.max() <= atol, (f"{what}: max |diff| {diff.max():.3e} > {atol:.2g}; first disagreement at flat "
                                f"index {worst}: ours {ours.flatten()[worst]:.6f} vs ref {ref.flatten()[worst]:.6f}")


def n_diff(a, b):
    """How many entries differ: a count reads better in a failure message than two tensor dumps."""
    return int((a != b).sum())


def assert_one_line_error(code, err: str, *fragments: str) -> None:
    """A user's error: exit code 2 and one line on stderr that says each of `fragments`."""
    assert code == 2, f"exit {code}, expected 2; stderr: {err[-2000:]}"
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line on stderr: {err[-2000:]!r}"
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def said_lines(stderr: str) -> list[str]:
    """The lines of a stderr that are not a progress bar (tqdm's bars end their lines with \\r, then go)."""
    return [line for line in stderr.replace("\r", "\n").splitlines()
            if line.strip() and not re.search(r"\d+/\d+ \[|\d+it \[", line)]


def record_moves(monkeypatch) -> list[tuple[nn.Module, torch.device]]:
    """Every `module.to(device)` call from here on, in order: with device = cpu, the only trace an offload leaves."""
    moves, to = [], nn.Module.to

    def recording_to(module, device, *args, **kwargs):
        moves.append((module, torch.device(device)))
        return to(module, device, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", recording_to)
    return moves


def assert_each_visits(modules, moves, device, what):
    """Each module went to `device` once and then back to the CPU, and stayed there."""
    for name, module in modules.items():
        trips = [to.type for m, to in moves if m is module]
        assert trips == [device, "cpu"], f"{what}: {name} was moved to {trips}, expected [{device!r}, 'cpu']"
        where = {p.device.type for p in module.parameters()}
        assert where == {"cpu"}, f"{what}: {name}'s parameters are on {where} after the loop"


def watch_offload(monkeypatch) -> list[tuple[str, nn.Module]]:
    """Every block turn of checkpoint.offloaded from here on, ("visit" | "leave", block) in order: on the CPU, where a
    visit moves nothing, the only trace it leaves."""
    import checkpoint

    events, visit, leave = [], checkpoint.visit, checkpoint.leave
    def visiting(block, device):
        events.append(("visit", block))
        return visit(block, device)

    def leaving(block, kept):
        events.append(("leave", block))
        leave(block, kept)

    monkeypatch.setattr(checkpoint, "visit", visiting)
    monkeypatch.setattr(checkpoint, "leave", leaving)
    return events


def assert_one_block_at_a_time(events: list[tuple[str, nn.Module]], least: int, what: str) -> None:
    """Each visit of a block is followed by its leave, before any other block visits; `least` visits at least."""
    kinds = [kind for kind, _ in events]
    paired = all(events[i][1] is events[i + 1][1] for i in range(0, len(events), 2))
    assert kinds == ["visit", "leave"] * (len(kinds) // 2) and paired, f"{what}: a block was not brought back at once"
    assert kinds.count("visit") >= least, f"{what}: {kinds.count('visit')} block turns, expected {least} at least"


@torch.no_grad()
def assert_cached_logits_equal_the_full_forward(model, vocab: int, atol: float, what: str) -> None:
    """40 tokens: 20 at once, then one at a time to 37, then three at once (the causal mask shifted by a filled
    cache, and past a 16-token window where the model has one); the same logits as one full forward, within atol."""
    from kit.data import random_ids

    ids = random_ids(2, 40, vocab)
    full = model(ids)
    cache = model.new_cache(40, batch=2)
    stepped = [model(ids[:, :20], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(20, 37)]
    stepped.append(model(ids[:, 37:40], cache=cache))
    assert_close(torch.cat(stepped, dim=1), full, atol, f"{what}: cached decoding vs the full forward")


@torch.no_grad()
def assert_greedy_generation_matches(model, reference, vocab: int, what: str) -> None:
    """30 greedy tokens after a 12-token prompt (to position 42, past a 16-token window): mumoe.generate's tokens
    are transformers' `generate`'s."""
    import mumoe
    from kit.data import random_ids

    prompt = random_ids(1, 12, vocab, seed=3)
    ours = mumoe.generate(model, prompt[0].tolist(), 30, eos_id=None)
    theirs = reference.generate(prompt, max_new_tokens=30, do_sample=False, use_cache=True, eos_token_id=None,
                                pad_token_id=0)[0, 12:].tolist()
    assert ours == theirs, f"{what}: ours {ours} vs transformers {theirs}"
