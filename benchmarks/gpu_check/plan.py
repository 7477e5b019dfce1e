"""The plan: every check, sanitizer run and benchmark per topic, with shapes, dtypes and an
estimated time, so ``--dry-run`` shows what a lent machine will do and that it fits its budget.

The seconds are estimates for one H100 / H200, written before any GPU run (none was measured):
each run prints its items' real seconds next to them, and those replace these numbers.

Budget (issue 13, section 5): the build (``pip install -e .``) plus the full check <= 7 minutes;
``--quick`` <= 3 minutes for the check itself, so build + quick also fits one 10-minute command.
"""

import importlib.util
import shutil
from dataclasses import dataclass, field, replace

TOPICS = ("lsa", "matcher", "matching_cost", "box_loss", "pairwise_giou", "attention", "moe_dispatch",
          "unit_step", "patch_transformers")
DTYPES = ("bfloat16", "float16", "float32")
KINDS = ("check", "sanitizer", "bench")  # the order they run in: correctness first

BUILD_S = 75  # estimate: pip install --no-build-isolation --no-deps -e . (builds _C for sm_90)
STARTUP_S = 10  # estimate: imports, CUDA context, first allocations
FULL_BUDGET_S = 7 * 60  # build + full check
QUICK_BUDGET_S = 3 * 60  # quick check (the build is not counted: it runs once per machine)

# How to bring a missing optional tool (README, "Development").
HOW_TO_GET = {
    "torch_linear_assignment": "carry a cp312 wheel (README: Development)",
    "lapx": "carry a cp312 wheel (README: Development)",
    "compute-sanitizer": "it ships with the CUDA toolkit; this machine has none on PATH",
}


@dataclass(frozen=True)
class Item:
    """One thing the check does.

    ``needs``: tools it cannot run without (``cuda``, ``cuda_ext``, ``triton``,
    ``compute-sanitizer``); ``baselines``: the providers a benchmark times against unit_fast,
    optional ones by tool name in ``optional``.  ``skip`` (set by ``resolve``) says why the whole
    item is skipped; ``skipped_baselines`` why some baselines are.
    """

    topic: str
    kind: str
    name: str
    shapes: tuple
    dtypes: tuple
    est_s: float
    needs: tuple = ("cuda",)
    baselines: tuple = ()
    optional: dict = field(default_factory=dict)  # baseline -> tool it needs
    params: dict = field(default_factory=dict)
    skip: str | None = None
    skipped_baselines: dict = field(default_factory=dict)

    @property
    def key(self):
        return f"{self.topic}/{self.kind}/{self.name}"


def _items(quick):
    """The items of the full or the quick plan, unresolved (as a machine with every tool runs them)."""
    q = quick
    fp32 = ("float32",)
    out = [
        # -- correctness: every CUDA / Triton path against its reference, three dtypes --------
        Item("lsa", "check", "solve_vs_scipy",
             ("detr_coco_b64", "dino_900q_b16") if q else
             ("detr_coco_b64", "detr_coco_dense_b64", "dino_900q_b16", "square_300_b16", "rtdetr_300q_b64"),
             DTYPES, 5 if q else 15, needs=("cuda", "cuda_ext")),
        Item("matcher", "check", "match_all_vs_detr", ("detr_6layers_b64",), DTYPES, 4 if q else 6,
             needs=("cuda", "cuda_ext", "triton")),
        Item("matching_cost", "check", "triton_vs_reference",
             ("detr_coco_b64_L6",) if q else ("detr_coco_b64_L6", "dino_900q_b16_L1", "rtdetr_300q_b64_L6"),
             DTYPES, 3 if q else 8, needs=("cuda", "triton")),
        Item("box_loss", "check", "triton_vs_reference",
             ("pairs_1m",) if q else ("detr_coco_b64", "detr_b16_t100", "pairs_1m"),
             DTYPES, 3 if q else 6, needs=("cuda", "triton")),
        Item("pairwise_giou", "check", "triton_vs_reference",
             ("detr_crossimage_b64",) if q else
             ("detr_image_q100_t20", "dino_image_q900_t100", "detr_crossimage_b64"),
             DTYPES, 3 if q else 6, needs=("cuda", "triton")),
        Item("attention", "check", "triton_vs_reference",
             ("unit_encoder_dc5", "unit_decoder_cross") if q else
             ("unit_encoder_s32", "unit_encoder_dc5", "unit_decoder_cross", "bert_base_l128"),
             DTYPES, 10 if q else 25, needs=("cuda", "triton")),
        Item("attention", "check", "autotune_configs", ("head_dim_32", "head_dim_96"), DTYPES, 45,
             needs=("cuda", "triton"),
             skip=("--quick: only the configs the autotuner picks are checked (by triton_vs_reference)"
                   if q else None)),
        # moe_dispatch: the Triton and torch backends against float64 (the per-token reference at the
        # tiny shape, relu and gelu; the per-expert loop peer at the others, gelu).  Its timing
        # (Triton vs the torch backend, the per-expert loop and padded bmm, forward + backward)
        # is an item of kind "check" that also records cases: short, and it runs once the
        # kernels it times have been compiled by the check before it.  In the full plan both
        # run only when asked for (``--only moe_dispatch``): see ``ON_REQUEST``.
        # Estimates: mostly compiling 5 kernels per dtype and activation (gelu only in --quick).
        Item("moe_dispatch", "check", "triton_vs_reference",
             ("unit_n4096_e8_k2",) if q else ("unit_n4096_e8_k2", "cpu_n2048_e16_k2", "tiny_n128_e4_k2"),
             DTYPES, 14 if q else 30, needs=("cuda", "triton"), params={"backends": ("triton", "torch")}),
        Item("moe_dispatch", "check", "timing_vs_peers", ("unit_n4096_e8_k2",), DTYPES, 6,
             needs=("cuda", "triton"), baselines=("unit_fast_torch", "per_expert_loop", "padded_bmm")),
        Item("unit_step", "check", "fast_vs_reference_loss", ("coco_det_s32",), DTYPES, 20,
             needs=("cuda", "cuda_ext", "triton"),
             skip="--quick: the op checks cover the step's kernels" if q else None),
        # -- sanitizer on the LSA kernel -------------------------------------------------------
        Item("lsa", "sanitizer", "memcheck", ("lsa_sanitize",), fp32, 25 if q else 35,
             needs=("cuda", "cuda_ext", "compute-sanitizer"), params={"tool": "memcheck", "timeout_s": 150}),
        Item("lsa", "sanitizer", "racecheck", ("lsa_sanitize",), fp32, 25 if q else 35,
             needs=("cuda", "cuda_ext", "compute-sanitizer"), params={"tool": "racecheck", "timeout_s": 150}),
        # -- benchmarks: unit_fast and its baselines, timed side by side in one run -----------
        Item("lsa", "bench", "solver",
             ("detr_coco_b64", "dino_900q_b16") if q else
             ("detr_coco_b64", "detr_coco_dense_b64", "dino_900q_b16", "square_300_b16", "rtdetr_300q_b64"),
             fp32, 6 if q else 20, needs=("cuda", "cuda_ext"),
             baselines=("scipy_loop", "torch_linear_assignment", "lapx_lapjvh_batch", "lapx_lapjvr_batch"),
             optional={"torch_linear_assignment": "torch_linear_assignment", "lapx_lapjvh_batch": "lapx",
                       "lapx_lapjvr_batch": "lapx"}),
        Item("matcher", "bench", "six_layers", ("detr_6layers_b64",), fp32, 5 if q else 8,
             needs=("cuda", "cuda_ext", "triton"), baselines=("detr_matcher",)),
        Item("matching_cost", "bench", "cost",
             ("detr_coco_b64_L6",) if q else ("detr_coco_b64_L6", "dino_900q_b16_L1", "rtdetr_300q_b64_L6"),
             fp32, 3 if q else 6, needs=("cuda", "triton"), baselines=("detr_cross_image", "reference")),
        Item("box_loss", "bench", "fwd_bwd", ("pairs_1m",) if q else ("detr_coco_b64", "pairs_1m"),
             fp32, 3 if q else 5, needs=("cuda", "triton"), baselines=("detr_reference", "torchvision")),
        Item("attention", "bench", "fwdbwd",
             ("unit_encoder_dc5",) if q else ("unit_encoder_dc5", "unit_decoder_cross"),
             ("bfloat16",), 20 if q else 55, needs=("cuda", "triton"),
             baselines=(("mha_need_weights", "mha_no_weights", "sdpa_efficient", "sdpa_flash", "sdpa_cudnn")
                        if q else ("mha_need_weights", "mha_no_weights", "sdpa_math", "sdpa_efficient",
                                   "sdpa_flash", "sdpa_cudnn", "flex_attention"))),
        # The same-batch pair (bench_unit_step.SAME_BATCH = 2 images each) comes first, then the
        # largest fast batch against MMF's one image per step.
        Item("unit_step", "bench", "train_step", ("coco_det_dc5",), ("bfloat16",), 35 if q else 40,
             needs=("cuda", "cuda_ext", "triton"), baselines=("mmf_reference",),
             params={"fast_batches": (8,) if q else (8, 32)}),
        # transformers' own DETR / RT-DETR loss (main + 5 auxiliary layers) unpatched vs under
        # patch_transformers(), bench_patch_transformers' settings; the patched loss is checked
        # against the unpatched one before timing.  Estimate: mostly the first Triton compiles.
        Item("patch_transformers", "bench", "loss", ("detr_b8_q100", "rtdetr_b8_q300"), fp32, 10,
             needs=("cuda", "cuda_ext", "triton"), baselines=("transformers",)),
    ]
    return out


# Both plans' estimates already fill their budgets (issue 13: build + full check <= 7 minutes,
# quick <= 3), so these topics' items join a plan only when named by ``--only``: moe_dispatch in
# the full plan (the quick plan, which has room for it, always runs it), patch_transformers in
# both.  Skipped here, they cost 0 s of the estimate.
ON_REQUEST = {"moe_dispatch": ("full",), "patch_transformers": ("full", "quick")}


def _on_request_skip(topic, quick):
    return (f"not in the default {'quick' if quick else 'full'} plan: its estimate fills the "
            f"{'3' if quick else '7'}-minute budget without {topic}; run it with --only {topic}")


def _fit_budget(items, quick, only):
    """``items`` (resolved) with each ``ON_REQUEST`` topic's set to 0 s and, unless already
    skipped for a missing tool, skipped with its reason -- unless ``only`` names it."""
    plan = "quick" if quick else "full"
    skip = {t for t, plans in ON_REQUEST.items() if plan in plans and not (only and t in only)}
    return [replace(it, skip=it.skip or _on_request_skip(it.topic, quick), est_s=0)
            if it.topic in skip else it for it in items]


def probe_tools():
    """``{tool: None if present else why not}`` on this machine.  Touches no CUDA context."""
    import torch

    from unit_fast import _ext

    cuda = torch.cuda.is_available()
    tools = {
        "cuda": None if cuda else "no CUDA device",
        "cuda_ext": None if _ext.HAS_CUDA_EXT else
        ("unit_fast._C has no CUDA kernels (run pip install --no-build-isolation --no-deps -e . there)"
         if _ext.HAS_EXT else f"unit_fast._C not loaded ({_ext.EXT_ERROR})"),
        "triton": None if importlib.util.find_spec("triton") else "triton is not installed",
        "compute-sanitizer": None if shutil.which("compute-sanitizer") else
        f"compute-sanitizer not on PATH ({HOW_TO_GET['compute-sanitizer']})",
    }
    for module, tool in (("torch_linear_assignment", "torch_linear_assignment"), ("lap", "lapx")):
        found = importlib.util.find_spec(module) is not None
        tools[tool] = None if found else f"{tool} is not installed ({HOW_TO_GET[tool]})"
    return tools


def resolve(items, tools):
    """Sets each item's ``skip`` (first missing tool it needs) and ``skipped_baselines``."""
    out = []
    for it in items:
        skip = it.skip or next((tools[t] for t in it.needs if tools.get(t)), None)
        missing = {b: tools[t] for b, t in it.optional.items() if tools.get(t)}
        out.append(replace(it, skip=skip, skipped_baselines=missing))
    return out


def build_plan(quick=False, only=None, tools=None):
    """The resolved, ordered items (checks, then sanitizer, then benchmarks) of ``only`` topics
    (all when None).  ``tools``: a ``probe_tools()``-style dict (probed here when None)."""
    if only:
        unknown = sorted(set(only) - set(TOPICS))
        if unknown:
            raise ValueError(f"unknown topic(s) {unknown}; topics are {list(TOPICS)}")
    items = [it for it in _items(quick) if not only or it.topic in only]
    items.sort(key=lambda it: KINDS.index(it.kind))  # stable: topic order within a kind
    return _fit_budget(resolve(items, probe_tools() if tools is None else tools), quick, only)


def estimate_s(items, quick=False):
    """Estimated seconds of the check (every item, skipped or not: the worst case), and of the
    budgeted whole (the build included for the full plan)."""
    check = STARTUP_S + sum(it.est_s for it in items if not (it.skip or "").startswith("--quick"))
    return check, check + (0 if quick else BUILD_S)


def budget_s(quick=False):
    return QUICK_BUDGET_S if quick else FULL_BUDGET_S


def format_plan(items, quick=False):
    """The ``--dry-run`` text: one line per item, its skip reasons, and the budget line."""
    mode = "quick" if quick else "full"
    lines = [f"gpu_check plan ({mode}); seconds are estimates for one H100/H200, not measurements", ""]
    lines.append(f"{'topic':<18} {'kind':<9} {'item':<24} {'est s':>5}  shapes / dtypes")
    for it in items:
        lines.append(f"{it.topic:<18} {it.kind:<9} {it.name:<24} {it.est_s:>5.0f}  "
                     f"{', '.join(it.shapes)} / {', '.join(it.dtypes)}")
        if it.baselines:
            lines.append(f"{'':<54}baselines: {', '.join(it.baselines)}")
        if it.skip:
            lines.append(f"{'':<54}skipped: {it.skip}")
        for b, why in it.skipped_baselines.items():
            lines.append(f"{'':<54}skipped baseline {b}: {why}")
    check, total = estimate_s(items, quick)
    limit = budget_s(quick)
    what = "check" if quick else f"build ({BUILD_S} s) + check"
    verdict = "fits" if total <= limit else "DOES NOT FIT"
    lines += ["", f"estimate: check {check:.0f} s; {what} {total:.0f} s <= budget {limit} s: {verdict}"]
    return "\n".join(lines)
