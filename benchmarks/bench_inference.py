"""Side-by-side inference speed: qwen2audio vs transformers on the same random weights and inputs.

    python benchmarks/bench_inference.py [--size small|medium] [--threads N] [--decode-tokens 64]
                                         [--ours float32,bfloat16,int8,int8+compile] [--plot FILE.svg]

Both models are built from one config with one set of random weights (transformers builds and saves
them, qwen2audio loads the saved directory), run on the CPU in --dtype, greedy, with the stop tokens
ignored so that both produce exactly the same number of tokens. Measured:
- prefill: audio features + encoder + projector + LLM prefill + first token, for one 30 s clip;
- decode tokens/s at batch 1 (one 30 s clip) and batch 8 (eight 5 s clips): the time from the first
  new token to the last, timed inside the loop (a streamer for transformers, the engine's own step
  stream for ours), so prefill noise stays out of it.
Each figure is the best of --repeats runs. Results are printed as a markdown table with ratios.

``--ours`` runs qwen2audio in several forms against the same transformers run (in --dtype): float32,
bfloat16 (the weights rounded to bfloat16) and int8 (``--quantize int8`` on the float32 weights); a form
with ``+compile`` (e.g. ``int8+compile``) runs its decoding steps through torch.compile (``--compile``),
compiled before the timing starts (the compile's wall time is printed apart). Each decode row also
says how many bytes of LLM weights a step reads per second, as a fraction of the memory's read speed
measured in the same run (``torch.sum`` over 1 GiB). ``--plot`` draws the ratios as bars against the
issue's targets (needs matplotlib: the ``eval`` extra).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen2audio.checkpoint import load_model  # noqa: E402
from qwen2audio.generation.engine import Engine  # noqa: E402
from qwen2audio.generation.sampling import SamplingParams  # noqa: E402
from qwen2audio.generation.scheduler import Scheduler  # noqa: E402
from qwen2audio.text import build_byte_level_tokenizer, render_chat  # noqa: E402

SIZES = {
    # Whisper-base-sized encoder with 128 mel bins; a 4-layer Qwen2 with Qwen2's 151936-token vocabulary.
    "small": dict(audio=dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048),
                  text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=2)),
    # Qwen2.5-0.5B-shaped LLM (24 layers, hidden 896, GQA 14/2), 12-layer d=768 encoder.
    "medium": dict(audio=dict(d_model=768, encoder_layers=12, encoder_attention_heads=12, encoder_ffn_dim=3072),
                   text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                             num_key_value_heads=2)),
}
VOCAB = 151936
FORMS = {"float32": (torch.float32, None), "bfloat16": (torch.bfloat16, None), "int8": (torch.float32, "int8")}


def read_bandwidth() -> float:
    """GB/s of a plain read: torch.sum over 1 GiB of float32, best of 5."""
    big = torch.ones(1 << 28)
    return big.numel() * 4 / best(lambda: big.sum(), 5) / 1e9


def gemm_peak() -> float:
    """GFLOP/s of a float32 product the size of the prefill's (2048 x 2048 x 2048), best of 5: the most a
    float32 prefill can reach on this machine, whoever runs it."""
    a = torch.randn(2048, 2048)
    return 2 * 2048**3 / best(lambda: a @ a, 5) / 1e9


def prefill_gflop(cfg, n_tokens: int, last_layer_last_row: bool = False) -> float:
    """Multiply-adds x 2 of the prefill of one 30 s clip and a prompt of ``n_tokens`` (audio included):
    the encoder's convolutions, projections and attention over 1,500 frames, the projector, the LLM's
    products and causal attention over the prompt, and the head for the last position.

    ``last_layer_last_row``: less what ours leaves out, the last layer's output projection, attention and
    MLP for every prompt position but the last (their queries, keys and values are computed: one product)."""
    a, t = cfg.audio_config, cfg.text_config
    d, frames = a.d_model, 1500
    enc = 2 * 3 * a.num_mel_bins * d * 2 * frames + 2 * 3 * d * d * frames
    enc += a.encoder_layers * (2 * (4 * d * d + 2 * d * a.encoder_ffn_dim) * frames + 4 * frames * frames * d)
    h, kv = t.hidden_size, t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    per_token = 2 * (2 * h * h + 2 * h * kv + 3 * h * t.intermediate_size)
    llm = t.num_hidden_layers * (per_token * n_tokens + 2 * n_tokens * n_tokens * h)  # causal: half of 4 T^2 h
    if last_layer_last_row:
        # the output projection and MLP of all rows but one, and the attention but one query's (4 T h)
        llm -= (n_tokens - 1) * 2 * (h * h + 3 * h * t.intermediate_size) + 2 * n_tokens * n_tokens * h - 4 * n_tokens * h
    return (enc + 2 * d * h * frames // 2 + llm + 2 * h * t.vocab_size) / 1e9


def llm_weight_bytes(model) -> int:
    """Bytes of weights a decoding step reads: the LLM's products and its head, as stored."""
    from qwen2audio.generation import weights

    total = 0
    for block, name in weights.llm_linears(model):
        m = getattr(block, name)
        if isinstance(m, weights.PackedLinear):
            total += m.stored.numel() * m.stored.element_size() + (0 if m.scale is None else m.scale.numel() * 4)
        elif isinstance(m, weights.OneDNNLinear):
            total += m.in_features * m.out_features * 4
        else:
            total += m.weight.numel() * m.weight.element_size()
    return total


def build_reference(size: str, tokenizer):
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    s = SIZES[size]
    cfg = Qwen2AudioConfig(
        audio_config=dict(num_mel_bins=128, max_source_positions=1500, **s["audio"]),
        text_config=dict(vocab_size=VOCAB, max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, **s["text"]),
        audio_token_index=tokenizer.audio_id)
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(cfg).eval()
    model.config._attn_implementation = "sdpa"
    return model


def clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
            + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="weights dtype of transformers (and of ours unless --ours says otherwise)")
    ap.add_argument("--plot", type=Path, default=None, help="also draw the ratios to this SVG file")
    ap.add_argument("--ours", default=None,
                    help="comma-separated forms of qwen2audio to run: float32, bfloat16, int8 (default: --dtype)")
    args = ap.parse_args()
    forms = (args.ours or args.dtype).split(",")
    unknown = sorted({f for f in forms if f.removesuffix("+compile") not in FORMS})
    if unknown:
        ap.error(f"--ours: unknown form(s) {', '.join(unknown)}; choose from {', '.join(FORMS)}")
    torch.set_num_threads(args.threads)

    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor
    from transformers.generation.streamers import BaseStreamer
    from transformers import __version__ as hf_version

    tokenizer = build_byte_level_tokenizer()
    dtype = getattr(torch, args.dtype)
    ref = build_reference(args.size, tokenizer).to(dtype)
    tmp = Path(tempfile.mkdtemp())
    ref.save_pretrained(tmp)
    tokenizer.save(tmp)
    hf_tok = __import__("transformers").AutoTokenizer.from_pretrained(tmp)
    processor = Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=hf_tok)

    def prompt(i: int) -> str:
        return render_chat([{"role": "user", "content": [{"type": "audio", "audio": "x"},
                                                         {"type": "text", "text": f"What is in clip {i}?"}]}]).text

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):  # first call: the prompt; then once per step
            self.times.append(time.perf_counter())

        def end(self):
            pass

    @torch.inference_mode()
    def theirs(audios, n_new, stamps=None):
        processor.tokenizer.padding_side = "left"
        inputs = processor(text=[prompt(i) for i in range(len(audios))], audio=list(audios), sampling_rate=16000,
                           return_tensors="pt", padding=True)
        streamer = Stamps() if stamps is not None else None
        out = ref.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                           pad_token_id=tokenizer.pad_id, streamer=streamer)
        if streamer is not None:
            stamps.extend(streamer.times[1:])
        return out

    def decode_rate(fn, audios, n_new) -> float:
        rates = []
        for _ in range(args.repeats):
            stamps: list[float] = []
            fn(audios, n_new, stamps)
            assert len(stamps) == n_new, (len(stamps), n_new)
            rates.append(len(audios) * (n_new - 1) / (stamps[-1] - stamps[0]))
        return max(rates)

    one = [clip(30.0, 0)]
    eight = [clip(5.0, i) for i in range(8)]
    n = args.decode_tokens
    measures = ["prefill, one 30 s clip (s)", "decode, batch 1 (tokens/s)", "decode, batch 8 (tokens/s)"]
    reference_tokens = theirs(one, 8)[0, -8:].tolist()
    n_prompt = int(processor(text=[prompt(0)], audio=one, sampling_rate=16000, return_tensors="pt")["input_ids"].shape[1])
    gflop = prefill_gflop(ref.config, n_prompt)
    table = {measures[0]: {"transformers": best(lambda: theirs(one, 1), args.repeats)}}
    for label, audios in zip(measures[1:], (one, eight)):
        table[label] = {"transformers": decode_rate(theirs, audios, n + 1)}

    agreement, read_rates, compile_s, bandwidths = {}, {}, {}, {}
    for form in forms:
        form_dtype, quantize = FORMS[form.removesuffix("+compile")]
        compiled = form.endswith("+compile")
        engine = Engine(load_model(tmp, dtype=form_dtype), tokenizer, quantize=quantize, compile=compiled)
        if compiled:
            start = time.perf_counter()
            engine.warm_up()
            compile_s[form] = time.perf_counter() - start
            assert engine.compiled, f"{form}: torch.compile failed (see the warning above)"
        # Every prompt prefilled before the first decode step, so that the rows decode in step as one batch.
        scheduler = Scheduler(engine, max_slots=8, max_waiting=None, prefill_chunk=1 << 20, background=False)

        def ours(audios, n_new, stamps=None):
            reqs = [engine.prepare(prompt(i), [a]) for i, a in enumerate(audios)]
            params = SamplingParams(max_new_tokens=n_new, ignore_eos=True)
            streams = [scheduler.submit(r, params) for r in reqs]
            for _ in streams[0].events():
                if stamps is not None:  # one stamp per decode step
                    stamps.append(time.perf_counter())
            return [s.wait() for s in streams]

        tokens = ours(one, 8)[0].token_ids
        agreement[form] = sum(a == b for a, b in zip(tokens, reference_tokens))
        table[measures[0]][form] = best(lambda: ours(one, 1), args.repeats)
        # the memory's speed read just before and after this form's decoding: on a shared host it moved by
        # half within minutes (30 to 58 GB/s), so one figure for the whole run misstates the fractions
        around = [read_bandwidth()]
        for label, audios in zip(measures[1:], (one, eight)):
            table[label][form] = decode_rate(ours, audios, n + 1)
        around.append(read_bandwidth())
        bandwidths[form] = max(around)
        step_bytes = llm_weight_bytes(engine.model)
        read_rates[form] = {label: step_bytes * table[label][form] / len(audios) / 1e9
                            for label, audios in zip(measures[1:], (one, eight))}
        engine = scheduler = None  # free this form's weights before the next is loaded
    seen = list(bandwidths.values()) or [read_bandwidth()]
    memory = f"{min(seen):.1f}" + (f"-{max(seen):.1f}" if max(seen) - min(seen) >= 0.05 else "")
    peak = gemm_peak()

    params = sum(p.numel() for p in ref.parameters()) / 1e6
    same = ", ".join(f"{form} {agreement[form]}/8" for form in forms)
    print(f"\nqwen2audio vs transformers {hf_version} | size {args.size} ({params:.0f} M params, transformers in "
          f"{args.dtype}) | torch {torch.__version__} | {args.threads} threads | "
          f"{platform.processor() or platform.machine()} | memory read {memory} GB/s | "
          f"float32 product {peak:.0f} GFLOP/s | "
          f"greedy tokens equal to transformers': {same}"
          + "".join(f" | {form}: compiled in {s:.0f} s" for form, s in compile_s.items()) + "\n")
    print("| measure | transformers | " + " | ".join(f"qwen2audio {f}" for f in forms) + " |")
    print("|---|---|" + "---|" * len(forms))
    for label in measures:
        theirs_value = table[label]["transformers"]
        theirs_cell = f"{theirs_value:.3f}" + (f", {gflop / theirs_value:.0f} GFLOP/s" if label == measures[0] else "")
        cells = []
        for form in forms:
            value = table[label][form]
            ratio = theirs_value / value if label == measures[0] else value / theirs_value
            cell = f"{value:.3f} ({ratio:.2f}x)"
            if label == measures[0]:
                cell += f", {gflop / value:.0f} GFLOP/s"
            if form in read_rates and label in read_rates[form]:
                gbs = read_rates[form][label]
                cell += f", {gbs:.1f} GB/s = {gbs / bandwidths[form]:.2f} of memory"
            cells.append(cell)
        print(f"| {label} | {theirs_cell} | " + " | ".join(cells) + " |")
    print(f"\nratios: ours vs transformers (higher is faster); GFLOP/s: the prefill's {gflop:.0f} GFLOP ({n_prompt} "
          "prompt tokens) per second, against the float32 product's rate in the header; GB/s: bytes of LLM weights read per second by the decode steps (8 rows "
          "share one read), and their fraction of the memory's read speed taken just before and after that form's "
          "decoding (the higher of the two; the header gives the range over the run).")
    # transformers' time for the same clip against the shortest a float32 prefill can take here (all of its
    # GFLOP at the machine's float32 product rate): above this no float32 prefill can go on this machine
    ours_gflop = prefill_gflop(ref.config, n_prompt, last_layer_last_row=True)
    ceiling = table[measures[0]]["transformers"] * peak / ours_gflop
    print(f"float32 prefill ceiling on this machine: {ceiling:.2f}x transformers (its {table[measures[0]]['transformers']:.3f} s "
          f"against ours' {ours_gflop:.0f} GFLOP at {peak:.0f} GFLOP/s: {gflop - ours_gflop:.0f} of the {gflop:.0f} "
          f"GFLOP above are the last layer's other rows, which ours leaves out; transformers also computes the "
          f"head's logits at every prompt position, "
          f"{2 * n_prompt * ref.config.text_config.hidden_size * ref.config.text_config.vocab_size / 1e9:.0f} GFLOP "
          "more, which neither figure counts)")
    if args.plot is not None:
        ratios = {label: {form: (table[label]["transformers"] / table[label][form] if label == measures[0]
                                 else table[label][form] / table[label]["transformers"]) for form in forms}
                  for label in measures}
        plot_ratios(ratios, forms, args.plot, f"qwen2audio vs transformers {hf_version} ({args.dtype}), size "
                    f"{args.size}, {args.threads} threads, torch {torch.__version__}")
        print(f"plot: {args.plot}")


# The targets, per measure and form of ours (ratios to transformers in float32).
TARGETS = {("prefill", "float32"): 1.5, ("batch 1", "float32"): 2.0, ("batch 1", "bfloat16"): 3.0,
           ("batch 1", "int8"): 4.0, ("batch 8", "float32"): 2.0}


def plot_ratios(ratios: dict, forms: list[str], path: Path, title: str) -> None:
    """Grouped bars: per measure, each form's ratio to transformers, its target as a tick, 1x as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text stays text: a small file
    labels = list(ratios)
    width = 0.8 / len(forms)
    fig, ax = plt.subplots(figsize=(8, 4))
    for f, form in enumerate(forms):
        xs = [i - 0.4 + width * (f + 0.5) for i in range(len(labels))]
        values = [ratios[label][form] for label in labels]
        bars = ax.bar(xs, values, width * 0.9, label=f"qwen2audio {form}")
        ax.bar_label(bars, [f"{v:.2f}x" for v in values], fontsize=8)
        for x, label in zip(xs, labels):
            target = next((t for (key, tf), t in TARGETS.items()
                           if key in label and tf == form.removesuffix("+compile")), None)
            if target is not None:
                ax.plot([x - width * 0.45, x + width * 0.45], [target, target], color="black", linewidth=2)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="transformers (1x)")
    ax.plot([], [], color="black", linewidth=2, label="target")
    ax.set_xticks(range(len(labels)), [label.split(" (")[0] for label in labels])
    ax.set_ylabel("speed vs transformers (higher is faster)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
