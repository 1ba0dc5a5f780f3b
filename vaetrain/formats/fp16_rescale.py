"""An exact reparametrisation of a KL autoencoder that shrinks its activations for fp16.

GroupNorm divides out the scale of its input (``GN(s h) = GN(h)`` up to its eps), and a conv is linear, so many
activations of ``AutoencoderKL`` can be multiplied by a factor without changing what the model computes:

- **residual segments.** Between two width or resolution changes, the encoder's and the decoder's residual stream is
  one segment: ``conv_in``, every block's ``conv2`` (biases included), attention's ``proj_out`` and the segment's
  entry (a ``nin_shortcut`` or an up/downsample conv) write into it; norms (``norm1``, attention's ``norm``,
  ``norm_out``) and linear layers (``nin_shortcut``, up/downsample convs) read it. Scaling every write by ``s`` and
  dividing the weights of the linear readers by ``s`` scales the whole segment by ``s``;
- **inside a block**: ``conv1`` feeds only ``norm2``, so its output scales freely;
- **attention**: its norm's affine output feeds only the 1x1 q/k/v convs (gamma, beta times ``r``, their weights
  over ``r``); ``q`` times ``a`` with ``k`` over ``a`` keeps the logits; ``v`` times ``t`` with ``proj_out``'s weight
  over ``t``;
- **the latent side**: ``encoder.conv_out`` when a quant conv follows (its weight compensates), ``post_quant_conv``
  (``decoder.conv_in``'s weight compensates).

What it cannot reach, left to the finetune: what a nonlinearity sees (``norm1``/``norm2``/``norm_out``'s affine
output before SiLU), the attention logits and softmax beyond the q/k balance, the latents themselves
(``quant_conv`` / ``encoder.conv_out`` without one) and the image ``conv_out`` writes, and any single value whose
ratio to its segment's typical values is larger than fp16's range (one factor per segment moves them together).

Every factor is a power of two, so multiplying a weight by it is exact in floating point (short of subnormals): the
fp32 output changes only through the norms' eps (``eps / s^2`` against the group variance), which ``choose`` keeps
below ``eps_tol`` relative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from vaetrain.models.autoencoder_kl import AutoencoderKL, Decoder, Downsample, Encoder, Level, ResnetBlock, Upsample

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0 ** -14


@dataclass
class Site:
    """One factor ``2**exp``: the activations (module outputs) that scale with it and the norms that read it.

    ``kind``: stream (a residual segment), inner (conv1 -> norm2), latent (conv_out -> quant conv, post_quant_conv ->
    conv_in), attn_norm, attn_qk (q scales by the factor, k by its inverse), attn_v.
    """

    name: str
    kind: str
    activations: list[str] = field(default_factory=list)
    inverse: list[str] = field(default_factory=list)  # activations that scale by the inverse (attention's k)
    norms: list[str] = field(default_factory=list)
    exp: int = 0
    limit: str = ""  # what kept the factor from bringing the site under the headroom

    @property
    def factor(self) -> float:
        return 2.0 ** self.exp


@dataclass(frozen=True)
class Edge:
    """A layer whose weight is multiplied by ``2**(out - in)`` and bias by ``2**out`` (site exponents, signed)."""

    module: str
    into: tuple[str, int] | None  # (site, sign) of its input; None: an input no factor reaches
    out: tuple[str, int] | None


@dataclass
class Plan:
    sites: dict[str, Site]
    edges: list[Edge]
    unreachable: list[str]  # activations no factor reaches (see the module docstring)

    def exp_of(self, ref: tuple[str, int] | None) -> int:
        return 0 if ref is None else ref[1] * self.sites[ref[0]].exp

    def scale_of(self) -> dict[str, float]:
        """activation name -> the factor it is multiplied by."""
        out = {}
        for s in self.sites.values():
            out.update({a: s.factor for a in s.activations})
            out.update({a: 1.0 / s.factor for a in s.inverse})
        return out


class _Builder:
    def __init__(self):
        self.sites: dict[str, Site] = {}
        self.edges: list[Edge] = []

    def site(self, name: str, kind: str, *activations: str) -> str:
        self.sites[name] = Site(name, kind, list(activations))
        return name

    def edge(self, module: str, into: str | tuple[str, int] | None, out: str | tuple[str, int] | None) -> None:
        ref = (lambda r: None if r is None else r if isinstance(r, tuple) else (r, 1))
        self.edges.append(Edge(module, ref(into), ref(out)))

    def resnet(self, p: str, block: ResnetBlock, cur: str, new_site: str) -> str:
        self.sites[cur].norms.append(f"{p}.norm1")
        inner = self.site(f"{p}.conv1", "inner", f"{p}.conv1")
        self.sites[inner].norms.append(f"{p}.norm2")
        self.edge(f"{p}.conv1", None, inner)
        if block.nin_shortcut is not None:
            self.edge(f"{p}.nin_shortcut", cur, new_site)
            cur = self.site(new_site, "stream", f"{p}.nin_shortcut")
        self.edge(f"{p}.conv2", None, cur)
        self.sites[cur].activations += [f"{p}.conv2", p]
        return cur

    def attention(self, p: str, cur: str) -> None:
        self.sites[cur].norms.append(f"{p}.norm")
        r = self.site(f"{p}.norm", "attn_norm", f"{p}.norm")
        qk = self.site(f"{p}.qk", "attn_qk", f"{p}.q")
        self.sites[qk].inverse.append(f"{p}.k")
        v = self.site(f"{p}.v", "attn_v", f"{p}.v")
        self.edge(f"{p}.norm", None, r)
        self.edge(f"{p}.q", r, qk)
        self.edge(f"{p}.k", r, (qk, -1))
        self.edge(f"{p}.v", r, v)
        self.edge(f"{p}.proj_out", v, cur)
        self.sites[cur].activations += [f"{p}.proj_out", p]

    def mid(self, p: str, mid: nn.Module, cur: str) -> str:
        cur = self.resnet(f"{p}.block_1", mid.block_1, cur, "")
        if mid.attn_1 is not None:
            self.attention(f"{p}.attn_1", cur)
        cur = self.resnet(f"{p}.block_2", mid.block_2, cur, "")
        self.sites[cur].activations.append(p)
        return cur

    def level(self, p: str, stream: str, level: nn.Module, cur: str, n: int, resample: str,
              kind: type) -> tuple[str, int]:
        """One resolution level: its blocks (a channel change starts a new stream segment) and its resampling
        conv, which writes the next segment. Returns the current segment and its number."""
        for j, block in enumerate(level.block):
            n += block.nin_shortcut is not None
            cur = self.resnet(f"{p}.block.{j}", block, cur, f"{stream}.{n}")
        if isinstance(getattr(level, resample, None), kind):
            n += 1
            q = f"{p}.{resample}"
            self.edge(f"{q}.conv", cur, f"{stream}.{n}")
            cur = self.site(f"{stream}.{n}", "stream", f"{q}.conv", q)
        return cur, n

    def encoder(self, p: str, enc: Encoder, outer_quant: str | None) -> None:
        cur = self.site(f"{p}.stream.0", "stream", f"{p}.conv_in")
        self.edge(f"{p}.conv_in", None, cur)
        n = 0
        for i, level in enumerate(enc.down):
            cur, n = self.level(f"{p}.down.{i}", f"{p}.stream", level, cur, n, "downsample", Downsample)
        cur = self.mid(f"{p}.mid", enc.mid, cur)
        self.sites[cur].norms.append(f"{p}.norm_out")
        quant = f"{p}.quant_conv" if enc.quant_conv is not None else outer_quant
        if quant is not None:  # conv_out's output feeds only the quant conv, a linear layer that compensates
            lat = self.site(f"{p}.conv_out", "latent", f"{p}.conv_out")
            if enc.quant_conv is None:
                self.sites[lat].activations.append(p)
            self.edge(f"{p}.conv_out", None, lat)
            self.edge(quant, lat, None)

    def decoder(self, p: str, dec: Decoder, outer_post_quant: str | None) -> None:
        post = f"{p}.post_quant_conv" if dec.post_quant_conv is not None else outer_post_quant
        into = None
        if post is not None:  # the latent itself is fixed; what the post-quant conv makes of it feeds conv_in only
            into = self.site(post, "latent", post)
            self.edge(post, None, into)
        cur = self.site(f"{p}.stream.0", "stream", f"{p}.conv_in")
        self.edge(f"{p}.conv_in", into, cur)
        cur = self.mid(f"{p}.mid", dec.mid, cur)
        n = 0
        for i in reversed(range(len(dec.up))):
            cur, n = self.level(f"{p}.up.{i}", f"{p}.stream", dec.up[i], cur, n, "upsample", Upsample)
        self.sites[cur].norms.append(f"{p}.norm_out")


def sites(ae: AutoencoderKL) -> Plan:
    """Every factor ``ae`` admits (all at 1) and the layers each one changes."""
    if not isinstance(ae, AutoencoderKL):
        raise TypeError(f"fp16 rescaling is defined for AutoencoderKL, not {type(ae).__name__}")
    b = _Builder()
    if ae.encoder is not None:
        b.encoder("encoder", ae.encoder, "quant_conv" if ae.quant_conv is not None else None)
    if ae.decoder is not None:
        b.decoder("decoder", ae.decoder, "post_quant_conv" if ae.post_quant_conv is not None else None)
    reached = {a for s in b.sites.values() for a in s.activations + s.inverse}
    # containers that never run as one module (Level, ModuleList) and FLUX.2's latent BatchNorm (outside decode/encode)
    skip = (nn.ModuleList, Level, nn.BatchNorm2d)
    unreachable = [n for n, m in ae.named_modules() if n and n not in reached and not isinstance(m, skip)]
    return Plan(b.sites, b.edges, unreachable)


@dataclass(frozen=True)
class Stats:
    """What the audit measured of one activation: max |a|, its RMS, and for a GroupNorm the smallest variance of
    one (image, group) of its INPUT."""

    max_abs: float
    rms: float
    min_group_var: float | None = None


def choose(plan: Plan, stats: Mapping[str, Stats], headroom: float = 2.0 ** 12, floor: float = FP16_MIN_NORMAL,
           eps_tol: float = 1e-5, norm_eps: float = 1e-6) -> Plan:
    """Set every site's exponent: the largest factor <= 1 that brings its activations under ``headroom``, unless that
    would push their RMS below ``floor`` (fp16's subnormal range) or make ``eps / (s^2 var)`` of a norm reading it
    exceed ``eps_tol``; attention's q/k factor balances their maxima. Changes ``plan`` in place and returns it."""
    if not 0 < floor < headroom <= FP16_MAX:
        raise ValueError(f"need 0 < floor ({floor}) < headroom ({headroom}) <= {FP16_MAX}")
    for s in plan.sites.values():
        seen = [stats[a] for a in s.activations if a in stats]
        inv = [stats[a] for a in s.inverse if a in stats]
        if not seen:
            s.exp, s.limit = 0, "not measured"
            continue
        if s.kind == "attn_qk":
            peak_q, peak_k = max(x.max_abs for x in seen), max((x.max_abs for x in inv), default=0.0)
            s.exp = round(0.5 * math.log2(peak_k / peak_q)) if peak_q > 0 and peak_k > 0 else 0
            if max(peak_q, peak_k) > headroom and math.sqrt(peak_q * peak_k) > headroom:
                s.limit = "the q.k logits themselves exceed the headroom (not reachable)"
            continue
        peak = max(x.max_abs for x in seen)
        if not math.isfinite(peak):
            s.exp, s.limit = 0, "non-finite in fp32"
            continue
        want = min(0, math.floor(math.log2(headroom / peak))) if peak > 0 else 0
        bounds = {"headroom": want}
        typical = min((x.rms for x in seen if x.rms > 0), default=0.0)
        if typical > 0:
            bounds["fp16 subnormals"] = math.ceil(math.log2(floor / typical))
        variances = [stats[n].min_group_var for n in s.norms if n in stats and stats[n].min_group_var]
        if variances:  # eps / (s^2 var) <= 2 eps_tol: relative change of the normalised output ~eps_tol
            bounds["norm eps"] = math.ceil(0.5 * math.log2(norm_eps / (2 * eps_tol * min(variances))))
        s.exp = min(0, max(bounds.values()))
        if want < 0 and s.exp > want:
            s.limit = f"{max(bounds, key=bounds.get)} (2^{s.exp} instead of 2^{want})"
    return plan


@torch.no_grad()
def apply(ae: AutoencoderKL, plan: Plan) -> AutoencoderKL:
    """Multiply the weights as ``plan`` says, in place (exact: every factor is a power of two)."""
    modules = dict(ae.named_modules())
    for e in plan.edges:
        m = modules[e.module]
        into, out = plan.exp_of(e.into), plan.exp_of(e.out)
        if into == out == 0:
            continue
        if isinstance(m, nn.GroupNorm):  # its output does not depend on its input's scale: only the affine moves
            m.weight.mul_(2.0 ** out)
            m.bias.mul_(2.0 ** out)
            continue
        m.weight.mul_(2.0 ** (out - into))
        if m.bias is not None:
            m.bias.mul_(2.0 ** out)
    return ae


def plan_rows(plan: Plan, before: Mapping[str, Stats], after: Mapping[str, Stats] | None = None) -> list[dict]:
    """Per activation, in the audit's order: max |a| before, the factor applied, max |a| after, the site."""
    where = {}
    for s in plan.sites.values():
        where.update({a: (s, 1) for a in s.activations})
        where.update({a: (s, -1) for a in s.inverse})
    rows = []
    for name, st in before.items():
        site, sign = where.get(name, (None, 0))
        factor = site.factor ** sign if site is not None else 1.0
        row = {"name": name, "max_abs_before": st.max_abs, "factor": factor,
               "site": site.name if site is not None else None,
               "reachable": site is not None,
               "expected_after": st.max_abs * factor}
        if after is not None and name in after:
            row["max_abs_after"] = after[name].max_abs
        if site is not None and site.limit:
            row["limit"] = site.limit
        rows.append(row)
    return rows
