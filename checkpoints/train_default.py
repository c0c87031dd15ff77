"""Train the embedded default model on text that ships with a Debian machine.

    apt-get update && apt-get install -y fortunes   # once, as root (or pass --install-data as root)
    python checkpoints/train_default.py [--steps 700] [--seed 0] [--out checkpoints/default]
    python checkpoints/train_default.py --steps 0    # random init, same tokenizer and config

Corpus: Debian's `fortunes` (/usr/share/games/fortunes), /usr/share/common-licenses, and the
docstrings of the Python standard library. A byte-level BPE tokenizer (`tokenizers`) is trained on
it, then a small Llama with JAX + optax on the CPU. A third of the fortunes and docstrings are
wrapped in the chat template (a short user request, the text as the assistant's turn, then
<|end|>), so /v1/chat/completions answers in kind and stops by itself. Deterministic given --seed (and the corpus).
Writes our orbax checkpoint, the tokenizer with a chat template, a held-out text, the loss curve
(PNG) and training numbers (JSON) into --out.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import pkgutil
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

FORTUNES = Path("/usr/share/games/fortunes")
LICENSES = Path("/usr/share/common-licenses")
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4, num_kv_heads=2,
             head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
             tie_word_embeddings=True, bos_token_id=0, eos_token_ids=(1, 6))  # <|eos|>, <|end|> (ends a chat turn)


def fortunes_text() -> list[str]:
    if not FORTUNES.is_dir():
        sys.exit("missing corpus: run `apt-get update && apt-get install -y fortunes` first (Debian package, "
                 "see /usr/share/doc/fortunes/copyright), or rerun this script as root with --install-data")
    docs = []
    for f in sorted(FORTUNES.iterdir()):
        if f.suffix or f.is_dir():
            continue  # skip .dat indexes and .u8 links
        docs += [d.strip() for d in f.read_text(errors="ignore").split("\n%\n") if d.strip()]
    return docs


def install_data():
    import os
    import subprocess

    if FORTUNES.is_dir():
        return
    if os.geteuid() != 0:
        sys.exit("--install-data needs root: run `sudo apt-get update && sudo apt-get install -y fortunes`")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "fortunes"], check=True, env=env)


def stdlib_docstrings() -> list[tuple[str, str]]:
    """(qualified name, docstring) of the stdlib's modules and their public members, unique by text."""
    docs = {}
    warnings.simplefilter("ignore")
    for mod in sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names):
        if mod.startswith("_") or mod in ("antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"):
            continue
        try:
            m = importlib.import_module(mod)
        except Exception:
            continue
        for name in [""] + [n for n in sorted(dir(m)) if not n.startswith("_")]:
            obj = getattr(m, name, None) if name else m
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 80 and getattr(obj, "__module__", mod) in (mod, None):
                doc = re.sub(r"[ \t]+", " ", doc.strip())
                docs.setdefault(doc, f"{mod}.{name}" if name else mod)
    return sorted((name, doc) for doc, name in docs.items())


FORTUNE_ASKS = ["Tell me a fortune.", "Tell me a joke.", "Say something wise.", "Give me a quote.", "Cheer me up.",
                "Any advice?", "Tell me something interesting.", "Hello!", "Hi.", "What do you think?"]
DOC_ASKS = ["What does {} do?", "Explain {}.", "What is {}?", "Document {}."]
SYSTEM = "You are a helpful assistant."


def chat(user: str, assistant: str, with_system: bool) -> str:
    system = f"<|system|>{SYSTEM}<|end|>" if with_system else ""
    return f"{system}<|user|>{user}<|end|><|assistant|>{assistant}<|end|>"


def corpus(seed: int) -> tuple[list[str], list[str], list[str]]:
    """(training texts, the same as chat documents where chosen, held-out texts); split by document."""
    docs = [("fortune", d) for d in fortunes_text()]
    docs += [("license", f.read_text(errors="ignore")) for f in sorted(LICENSES.iterdir()) if f.is_file()]
    docs += [(name, d) for name, d in stdlib_docstrings()]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(docs))
    docs = [docs[i] for i in order]
    cut = max(1, len(docs) // 100)
    held, train = docs[:cut], docs[cut:]
    trained = []
    for kind, text in train:
        if kind != "license" and rng.random() < 1 / 3:
            ask = (FORTUNE_ASKS[rng.integers(len(FORTUNE_ASKS))] if kind == "fortune"
                   else DOC_ASKS[rng.integers(len(DOC_ASKS))].format(kind))
            text = chat(ask, text, rng.random() < 0.2)
        trained.append(text)
    return [t for _, t in train], trained, [t for _, t in held]


def train_tokenizer(docs, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=MODEL["vocab_size"], special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    assert [tok.token_to_id(s) for s in SPECIALS] == list(range(len(SPECIALS)))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", additional_special_tokens=SPECIALS[3:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    # Also inside tokenizer_config.json, for readers that do not look for chat_template.jinja.
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
    return fast


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "default"))
    ap.add_argument("--minutes", type=float, default=30.0, help="safety stop (a run cut by it is not reproducible)")
    ap.add_argument("--steps", type=int, default=700, help="0 writes the random-init model (same tokenizer, config)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--install-data", action="store_true", help="as root: apt-get install -y fortunes if missing")
    args = ap.parse_args()
    if args.install_data:
        install_data()

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from tqdm import tqdm

    from tropical_jax.model.checkpoint import save_checkpoint
    from tropical_jax.config import ModelConfig
    from tropical_jax.model.dense import dense_logits
    from tropical_jax.model.llama import build_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Collected after the imports above, on purpose: a package's submodules that those imports loaded
    # count as its members, so the docstring set (and with it the split) depends on this order.
    train_docs, train_texts, held_docs = corpus(args.seed)
    tokenizer = train_tokenizer(train_docs, out)
    eos = tokenizer.eos_token_id
    stream = np.array([t for d in train_texts for t in tokenizer.encode(d) + [eos]], np.int32)
    held_text = "\n".join(held_docs)
    (out / "heldout.txt").write_text(held_text)
    # Words of the training text, so a test can check generations are language, not noise.
    words = {w.lower() for d in train_docs for w in re.findall(r"[A-Za-z]{2,}", d)}
    (out / "wordlist.txt").write_text("\n".join(sorted(words)))
    held = np.array(tokenizer.encode(held_text), np.int32)
    print(f"corpus: {len(train_docs)} documents, {len(stream)} training tokens, {len(held)} held-out tokens")

    cfg = ModelConfig(**MODEL, architecture="LlamaForCausalLM")
    model = build_model(cfg, jnp.float32, seed=args.seed)
    warm = min(100, args.steps // 4)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warm, max(args.steps, 1), args.lr / 10)
    optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1)),
                              wrt=nnx.Param)

    def loss_fn(m, batch):
        logits = dense_logits(m, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @nnx.jit
    def train_step(m, opt, batch):
        loss, grads = nnx.value_and_grad(loss_fn)(m, batch)
        opt.update(m, grads)
        return loss

    eval_loss = nnx.jit(loss_fn)
    rng = np.random.default_rng(args.seed)
    n = args.seq_len + 1
    held_batch = np.stack([held[i:i + n] for i in range(0, len(held) - n, n)][:32])
    losses, evals = [], []
    start = time.monotonic()
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        if time.monotonic() - start > args.minutes * 60:
            break
        idx = rng.integers(0, len(stream) - n, args.batch)
        loss = float(train_step(model, optimizer, np.stack([stream[i:i + n] for i in idx])))
        losses.append(loss)
        if step % 100 == 0:
            evals.append((step, float(eval_loss(model, held_batch))))
            bar.set_postfix(loss=f"{loss:.3f}", heldout=f"{evals[-1][1]:.3f}")
    final_held = float(eval_loss(model, held_batch))
    evals.append((len(losses), final_held))

    _, params = nnx.split(model, nnx.Param)
    save_checkpoint(out, cfg, params)
    stats = {"steps": len(losses), "minutes": round((time.monotonic() - start) / 60, 1), "batch": args.batch,
             "seq_len": args.seq_len, "final_train_loss": round(float(np.mean(losses[-50:])), 3) if losses else None,
             "heldout_loss": round(final_held, 3), "uniform_loss": round(math.log(cfg.vocab_size), 3),
             "params": int(sum(x.size for x in jax.tree.leaves(params))), "train_tokens": int(len(stream)),
             "seed": args.seed}
    (out / "training.json").write_text(json.dumps(stats, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(losses, lw=0.6, label="train")
    ax.plot(*zip(*evals), "o-", label="held-out")
    ax.axhline(stats["uniform_loss"], ls="--", c="gray", label="uniform")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    fig.savefig(out / "loss_curve.png", dpi=100, bbox_inches="tight")
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
