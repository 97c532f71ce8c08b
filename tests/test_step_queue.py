"""Decode steps queued ahead of the host (talis_cli.step_queue): the same tokens as steps run one by one."""
import pytest
import torch

from talis_cli.step_queue import QueuedStep, greedy_decode, host_buffers

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_decode_feeds_each_drawn_token_back(device):
    seen = []

    def step(tokens, pos):
        seen.append((tokens[:, 0].tolist(), pos))
        logits = torch.zeros(tokens.shape[0], 10, device=device)
        logits[:, (pos * 3) % 10] = 1.0  # the token drawn at slot pos
        return logits

    greedy_decode(step, torch.tensor([7], device=device), range(4, 8), torch.device(device))
    assert seen == [([7], 4), ([2], 5), ([5], 6), ([8], 7)]


@pytest.mark.parametrize("device", DEVICES)
def test_a_queued_step_reads_its_own_tokens_while_a_later_one_is_queued(device):
    device = torch.device(device)
    buffers = host_buffers(device, 3)
    assert len(buffers) == (2 if device.type == "cuda" else 0)
    first = QueuedStep(lambda: torch.tensor([1, 2, 3], device=device), buffers[0] if buffers else None, device)
    second = QueuedStep(lambda: first.tokens * 10, buffers[1] if buffers else None, device)
    assert first.ids() == [1, 2, 3] and second.ids() == [10, 20, 30]
    assert first.seconds >= 0 and second.seconds >= 0
