"""The training step compiles to one graph: no host sync or data-dependent shape in forward, loss or backward."""

from __future__ import annotations

import torch

from smoltrain.model.llama import build_model
from smoltrain.presets import get_preset


def _loss(model, ids, labels):
    return model(ids, labels=labels, loss_chunk=16, reduction="sum")


def test_train_step_compiles_fullgraph_and_matches_eager():
    """torch.compile(fullgraph=True) raises on any graph break (a `bool(tensor)` in the fused loss was one);
    the compiled step's loss and gradients equal the eager step's, ignored labels included. aot_eager runs
    dynamo and AOTAutograd (where graph breaks and syncs show) without inductor's C++ build."""
    torch.manual_seed(0)
    eager = build_model(get_preset("tiny").replace(num_hidden_layers=1)).train()
    compiled = build_model(eager.config).train()
    compiled.load_state_dict(eager.state_dict())
    ids = torch.randint(0, eager.config.vocab_size, (2, 24))
    labels = torch.roll(ids, -1, dims=1)
    labels[0, :5] = -100  # masked rows take the same path as packed ones: no branch on the data
    want = _loss(eager, ids, labels)
    want.backward()
    torch._dynamo.reset()
    # forward + fused loss as one graph; AOTAutograd traces the backward graph from it (as the trainer's
    # torch.compile(model) does), so the backward runs compiled too
    got = torch.compile(_loss, fullgraph=True, backend="aot_eager")(compiled, ids, labels)
    got.backward()
    assert torch.allclose(got, want, rtol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name
