"""Cross-check against PyTorch (issue 3 item 6).

Same initial weights (nnfast's W is (in, out), so torch's Linear.weight is W.T), same
batch order (DESIGN §3: one ``numpy.random.default_rng(seed)`` per fit, a fresh
``rng.permutation(N)`` every epoch, cut into consecutive batches), 2 epochs, every loss
and optimizer: the weights must agree to 1e-9 relative in float64 and 2e-4 in float32.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed: cross-check skipped")
F = torch.nn.functional
torch.set_num_threads(1)   # tiny matrices; avoids two OpenMP pools spinning against each other

import nnfast as nf  # noqa: E402

BACKENDS = ["cython", "numpy"]
RTOL = {"float64": 1e-9, "float32": 2e-4}

N, D, HIDDEN1, HIDDEN2, K = 150, 6, 16, 8, 3
BATCH, EPOCHS, SEED = 32, 2, 1234        # 5 iterations per epoch, the last one of 22

HIDDEN_ACTS = ("tanh", "relu")
LAST_ACT = {"cross_entropy": "softmax", "cross_entropy_probs": "softmax",
            "binary_cross_entropy": "sigmoid", "mse": "linear"}

OPTIMIZERS = {
    "sgd_momentum_nesterov_wd": (
        lambda: nf.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "sgd_momentum": (
        lambda: nf.SGD(lr=0.05, momentum=0.8),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8)),
    "sgd_plain": (
        lambda: nf.SGD(lr=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1)),
    "adam": (
        lambda: nf.Adam(lr=0.01),
        lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)),
    "adam_l2": (
        lambda: nf.Adam(lr=0.01, betas=(0.85, 0.99), eps=1e-7, weight_decay=1e-2),
        lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.85, 0.99), eps=1e-7, weight_decay=1e-2)),
    "adamw": (
        lambda: nf.Adam(lr=0.01, weight_decay=5e-2, decoupled_weight_decay=True),
        lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.9, 0.999), eps=1e-8,
                                    weight_decay=5e-2)),
}


def make_data(loss, dtype):
    rng = np.random.default_rng(7)
    X = rng.standard_normal((N, D))
    if loss == "cross_entropy":
        y = rng.integers(0, K, N)
    elif loss == "cross_entropy_probs":
        y = rng.dirichlet(np.ones(K), N)
    elif loss == "binary_cross_entropy":
        y = (rng.random((N, K)) < 0.4).astype(np.float64)
    else:
        y = np.stack([np.sin(X[:, 0]), X[:, 1] * X[:, 2], np.cos(X[:, 3])], axis=1)
    X = X.astype(dtype)
    if y.dtype.kind == "f":
        y = y.astype(dtype)
    return X, y


def torch_loss(out, target, loss):
    if loss in ("cross_entropy", "cross_entropy_probs"):
        return F.cross_entropy(out, target, reduction="mean")
    if loss == "binary_cross_entropy":
        return F.binary_cross_entropy_with_logits(out, target, reduction="none").sum(1).mean()
    return 0.5 * ((out - target) ** 2).sum(1).mean()


def torch_net(weights, dtype):
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    linears = []
    for i in range(len(weights) // 2):
        W, b = weights[2 * i], weights[2 * i + 1]
        lin = torch.nn.Linear(W.shape[0], W.shape[1], dtype=tdtype)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(W.T)))
            lin.bias.copy_(torch.from_numpy(b.copy()))
        linears.append(lin)
    return linears


def torch_forward(linears, x):
    """Hidden activations, then the last layer's pre-activation (logits / raw output)."""
    h = x
    for lin, act in zip(linears[:-1], HIDDEN_ACTS):
        h = lin(h)
        h = torch.tanh(h) if act == "tanh" else torch.relu(h)
    return linears[-1](h)


def torch_weights(linears):
    out = []
    for lin in linears:
        out.append(lin.weight.detach().numpy().T.copy())
        out.append(lin.bias.detach().numpy().copy())
    return out


def assert_weights_close(ws_nf, ws_torch, rtol):
    assert len(ws_nf) == len(ws_torch)
    for i, (a, b) in enumerate(zip(ws_nf, ws_torch)):
        assert a.shape == b.shape, i
        scale = float(np.max(np.abs(b)))
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale,
                                   err_msg=f"parameter {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("loss", ["cross_entropy", "cross_entropy_probs",
                                  "binary_cross_entropy", "mse"])
def test_matches_pytorch(backend, dtype, opt_name, loss):
    torch.manual_seed(0)
    X, y = make_data(loss, dtype)
    nf_loss = "cross_entropy" if loss == "cross_entropy_probs" else loss
    model = nf.Sequential(nf.Dense(D, HIDDEN1, activation=HIDDEN_ACTS[0]),
                          nf.Dense(HIDDEN1, HIDDEN2, activation=HIDDEN_ACTS[1]),
                          nf.Dense(HIDDEN2, K, activation=LAST_ACT[loss]),
                          dtype=dtype, seed=3, backend=backend)
    make_nf_opt, make_torch_opt = OPTIMIZERS[opt_name]
    linears = torch_net(model.get_weights(), dtype)
    params = [p for lin in linears for p in (lin.weight, lin.bias)]
    topt = make_torch_opt(params)

    hist = model.fit(X, y, loss=nf_loss, optimizer=make_nf_opt(), epochs=EPOCHS,
                     batch_size=BATCH, shuffle=True, seed=SEED)

    Xt = torch.from_numpy(X)
    yt = torch.from_numpy(y)
    rng = np.random.default_rng(SEED)
    torch_losses = []
    for _ in range(EPOCHS):
        perm = rng.permutation(N)
        for start in range(0, N, BATCH):
            idx = torch.from_numpy(perm[start:start + BATCH])
            topt.zero_grad()
            out = torch_forward(linears, Xt[idx])
            batch_loss = torch_loss(out, yt[idx], loss)
            batch_loss.backward()
            topt.step()
            torch_losses.append(batch_loss.item())

    rtol = RTOL[dtype]
    assert hist.iterations == hist.steps == len(torch_losses) == EPOCHS * 5
    np.testing.assert_allclose(hist.batch_losses, torch_losses, rtol=rtol, atol=rtol)
    ws_torch = torch_weights(linears)
    assert_weights_close(model.get_weights(), ws_torch, rtol)
    # the run moved the weights (so the comparison is not trivially of the start point)
    start = nf.Sequential(nf.Dense(D, HIDDEN1, activation=HIDDEN_ACTS[0]),
                          nf.Dense(HIDDEN1, HIDDEN2, activation=HIDDEN_ACTS[1]),
                          nf.Dense(HIDDEN2, K, activation=LAST_ACT[loss]),
                          dtype=dtype, seed=3, backend=backend).get_weights()
    assert not np.allclose(start[0], ws_torch[0], rtol=1e-3, atol=0)
    # predictions agree too (probabilities for softmax/sigmoid)
    with torch.no_grad():
        out = torch_forward(linears, Xt)
        if LAST_ACT[loss] == "softmax":
            out = torch.softmax(out, dim=1)
        elif LAST_ACT[loss] == "sigmoid":
            out = torch.sigmoid(out)
    np.testing.assert_allclose(model.predict(X), out.numpy(), rtol=rtol * 10, atol=rtol * 10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["cross_entropy", "binary_cross_entropy", "mse"])
def test_gradients_match_pytorch(backend, loss):
    """One batch through the low-level API: gradients() equals torch's .grad."""
    X, y = make_data(loss, "float64")
    model = nf.Sequential(nf.Dense(D, HIDDEN1, activation=HIDDEN_ACTS[0]),
                          nf.Dense(HIDDEN1, HIDDEN2, activation=HIDDEN_ACTS[1]),
                          nf.Dense(HIDDEN2, K, activation=LAST_ACT[loss]),
                          dtype="float64", seed=5, backend=backend)
    linears = torch_net(model.get_weights(), "float64")
    value = model.compute_gradients(X[:40], y[:40], loss=loss)
    out = torch_forward(linears, torch.from_numpy(X[:40]))
    tl = torch_loss(out, torch.from_numpy(y[:40]), loss)
    tl.backward()
    assert value == pytest.approx(tl.item(), rel=1e-12)
    grads_torch = []
    for lin in linears:
        grads_torch.append(lin.weight.grad.numpy().T.copy())
        grads_torch.append(lin.bias.grad.numpy().copy())
    assert_weights_close(model.gradients(), grads_torch, rtol=1e-10)
