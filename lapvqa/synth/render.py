"""Procedural chest radiographs in numpy, where the synthetic findings are visible.

Intensity is radiographic density: 0 is air (black), 1 is metal (white). Anatomy is painted on a
working grid whose longer side is ``WORK`` pixels (smooth structures need no more), upsampled to
the image's real size, then devices, quantum noise and the exposure curve are applied at full
resolution. Coordinates: ``u`` spans the image width from -1 to 1 (negative = image left =
patient's right, as radiographs are displayed), ``v`` the height from 0 (top) to 1.

What each finding looks like:
- cardiomegaly: cardiothoracic ratio ~0.6 instead of ~0.43;
- pleural effusion: fluid density fills the lung base with a meniscus that rises laterally,
  blunting the costophrenic angle;
- pneumothorax: an apical/lateral rim of black without lung markings, edged by a pleural line;
- consolidation: a dense patchy opacity in a lower lung zone;
- support devices: bright tubes/lines (ETT, NG tube, jugular line, PICC) or a pacemaker.

Sizes lean to the conspicuous end (moderate-to-large effusions and pneumothoraces, tubes as wide as
real ones on a 35-cm film) so that the findings stay visible at the demo's 64 px.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from lapvqa.synth.cohort import ImageSpec, StudySpec

WORK = 384  # working-grid size of the longer side
AIR, SOFT, LUNG, HEART, ABDOMEN = 0.03, 0.50, 0.17, 0.64, 0.62


def render(study: StudySpec, image: ImageSpec) -> np.ndarray:
    """The image as uint8 [rows, cols]: deterministic in ``image.seed``."""
    # Independent streams, so that adding a finding never changes the rest of the picture.
    streams = np.random.SeedSequence(image.seed).spawn(4)
    g_geo, g_body, g_finding, g_noise = (np.random.default_rng(s) for s in streams)
    geo = _Geometry(g_geo, image)
    lateral = image.view in ("LATERAL", "LL")
    density = (_lateral if lateral else _frontal)(g_body, g_finding, geo, study)
    curve = _ExposureCurve(g_geo, portable=study.frontal == "AP")
    # The curve is pointwise and monotone, so it commutes with upsampling: apply it on the
    # small grid.
    full = _upsample(curve(density), image.rows, image.cols)
    devices = _draw_devices(geo, study, lateral)
    if devices is not None:
        np.maximum(full, curve(devices), out=full)
    return curve.quantise(g_noise, full)


class _Geometry:
    """Working grid coordinates, with the patient slightly shifted and rotated."""

    def __init__(self, rng: np.random.Generator, image: ImageSpec):
        self.rows, self.cols = image.rows, image.cols
        self.scale = min(1.0, WORK / max(image.rows, image.cols))
        self.h = max(16, round(image.rows * self.scale))
        self.w = max(16, round(image.cols * self.scale))
        self.angle = float(rng.normal(0.0, 0.03))  # radians, ~ +-2 degrees
        self.du, self.dv = float(rng.normal(0, 0.03)), float(rng.normal(0, 0.015))
        y, x = np.mgrid[0:self.h, 0:self.w].astype(np.float32)
        x -= self.w / 2
        y -= self.h / 2
        c, s = np.cos(self.angle), np.sin(self.angle)
        self.u = (c * x + s * y) / (self.w / 2) + self.du
        self.v = (-s * x + c * y) / self.h + 0.5 + self.dv
        self.aspect = self.h / self.w  # one v unit is 2*aspect u units of distance

    def to_pixels(self, u: float, v: float) -> tuple[float, float]:
        """Full-resolution (x, y) of anatomical point (u, v)."""
        xr, yr = (u - self.du) * (self.w / 2), (v - 0.5 - self.dv) * self.h
        c, s = np.cos(self.angle), np.sin(self.angle)
        x, y = c * xr - s * yr + self.w / 2, s * xr + c * yr + self.h / 2
        return x / self.scale, y / self.scale


def _ramp(x, width: float):
    """Soft step: 0 below -width/2, 1 above +width/2 (anti-aliased edges)."""
    y = x * np.float32(1.0 / width) + np.float32(0.5)
    np.maximum(y, 0.0, out=y)
    return np.minimum(y, 1.0, out=y)


def _noise_field(rng, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth random field (unit variance-ish) with ``cells`` features across the image."""
    h, w = shape
    coarse = rng.standard_normal((max(2, cells * h // max(h, w)), cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, "F").resize((w, h), Image.BICUBIC))


def _ellipse(u, v, cu, cv, ru, rv):
    return np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2)


# ---- frontal view ------------------------------------------------------------------------------
def _frontal(rng, frng, geo: _Geometry, study: StudySpec) -> np.ndarray:
    a_anat, f = study.anatomy, study.findings
    u, v = geo.u, geo.v
    a, right = np.abs(u), u < 0  # mirrored lateral coordinate; image left = patient's right
    t = a_anat.thorax + float(rng.normal(0, 0.01))
    top = a_anat.lung_top + float(rng.normal(0, 0.005))
    dia = a_anat.diaphragm + float(rng.normal(0, 0.01))
    dia_side = np.where(right, dia - 0.025, dia)  # the liver lifts the right hemidiaphragm
    medial = 0.07
    ac, ra = (t + medial) / 2, (t - medial) / 2
    vc = top + 0.30

    img = np.full(u.shape, AIR, np.float32)
    wall = t + 0.13
    shoulders = 0.02 + 0.12 * np.clip(a / wall, 0, 1) ** 4
    img += (SOFT - AIR) * _ramp(wall - a, 0.03) * _ramp(v - shoulders, 0.03)

    dome = dia_side - a_anat.dome * (1 - np.clip(((a - ac) / ra) ** 2, 0, 1))
    shape = np.sqrt(((a - ac) / ra) ** 2 + (np.minimum(v - vc, 0) / (vc - top)) ** 2)
    lung = _ramp(1 - shape, 0.04) * _ramp(dome - v, 0.01)
    fluid = _effusion(f["effusion"], a, v, right, ac, ra, dome, top, dia_side) * lung
    ptx, pleura = _pneumothorax(f["pneumothorax"], a, v, right, ac, ra, vc, top, dome)
    ptx, pleura = ptx * lung, pleura * lung

    markings = np.exp(-(_noise_field(rng, u.shape, 22) / 0.45) ** 2)
    markings += 0.6 * np.exp(-(_noise_field(rng, u.shape, 40) / 0.4) ** 2)
    hilar = np.exp(-((a - 0.22) / 0.28) ** 2 - ((v - (top + 0.35)) / 0.25) ** 2)
    lung_density = LUNG + 0.06 * markings * (0.35 + 0.65 * hilar) + 0.05 * (v - top)
    lung_density = lung_density * (1 - ptx) + 0.035 * ptx  # no markings in the pleural air
    aerated = lung * (1 - fluid)
    img = img * (1 - aerated) + lung_density * aerated
    img += 0.22 * pleura * (1 - fluid)
    abdomen = _ramp(v - dome, 0.02) * _ramp(wall - a, 0.03)  # liver and spleen below the domes
    img += (ABDOMEN - SOFT) * abdomen
    opacity = _consolidation(frng, f["consolidation"], u, v, right, ac, ra, dia, geo.aspect)
    img += opacity * aerated * (1 - ptx)

    img += _ribs(u, v, a, t, top, dia, a_anat.rib_spacing)
    img = _mediastinum(img, u, v, top, dia, t, study, rng, geo.aspect)  # ribs fade behind the heart
    img += _ramp(0.05 - np.abs(u), 0.02) * (0.05 + 0.03 * np.cos(2 * np.pi * v / 0.045))  # spine
    bubble = _ramp(1 - _ellipse(u, v, 0.33, dia + 0.05, 0.09, 0.03), 0.15) * (v > dia + 0.02)
    return img - 0.25 * bubble * (u > 0)


def _effusion(state, a, v, right, ac, ra, dome, top, dia_side):
    if not state.present:
        return np.zeros_like(a)
    sides = {"right": right, "left": ~right, "bilateral": np.ones_like(right)}[state.side]
    height = (dia_side - top) * (0.32, 0.42, 0.52)[state.severity]
    lateral = np.clip((a - (ac - ra)) / (2 * ra), 0, 1)
    meniscus = dia_side - height * (0.5 + 0.5 * lateral ** 2)  # fluid climbs the chest wall
    return _ramp(v - meniscus, 0.02) * sides


def _pneumothorax(state, a, v, right, ac, ra, vc, top, dome):
    if not state.present:
        return np.zeros_like(a), np.zeros_like(a)
    side = right if state.side == "right" else ~right
    gap = (0.4, 0.5, 0.6)[state.severity]
    # The collapsed lung shrinks toward the hilum: a narrower, lower copy of the lung outline.
    taper = np.clip((dome - v) / (dome - top), 0, 1) ** 0.6
    ra_in = ra * (1 - gap * 0.55 * taper)
    ac_in = ac - (ra - ra_in)
    top_in = top + gap * 0.45 * (vc - top)
    inner = np.sqrt(((a - ac_in) / ra_in) ** 2 + (np.minimum(v - vc, 0) / (vc - top_in)) ** 2)
    ptx = _ramp(inner - 1, 0.03) * side
    pleura = np.exp(-((inner - 1) / 0.03) ** 2) * side
    return ptx, pleura


def _consolidation(rng, state, u, v, right, ac, ra, dia, aspect):
    if not state.present:
        return np.zeros_like(u)
    sign = -1.0 if state.side == "right" else 1.0
    cu = sign * (ac + float(rng.uniform(-0.05, 0.25)) * ra)  # the heart hides the medial base
    cv, r = dia - float(rng.uniform(0.14, 0.2)), float(rng.uniform(0.24, 0.3))
    return _blob(rng, u, v, cu, cv, r, aspect)


def _blob(rng, u, v, cu, cv, r, aspect):
    """A patchy airspace opacity of radius ``r`` (in u units) around (cu, cv)."""
    d2 = ((u - cu) / r) ** 2 + ((v - cv) * 2 * aspect / r) ** 2
    patchy = 0.8 + 0.2 * np.tanh(_noise_field(rng, u.shape, 30))
    return 0.6 * np.exp(-1.2 * d2 ** 1.5) * patchy


def _mediastinum(img, u, v, top, dia, t, study, rng, aspect):
    heart_ratio = study.anatomy.heart_ratio + float(rng.normal(0, 0.01))
    if study.findings["cardiomegaly"].present:
        heart_ratio = (0.58, 0.62, 0.67)[study.findings["cardiomegaly"].severity]
    hx = heart_ratio * t  # half the heart's width: CTR = heart width / thorax width
    right_border = -0.13 - 0.45 * max(0.0, hx - 0.3)  # a big heart grows to both sides
    cu, cv, hy = right_border + hx, dia - 0.11, 0.12 + 0.1 * hx
    heart = _ramp(1 - _ellipse(u, v, cu, cv, hx, hy), 0.06) * _ramp(v - (top + 0.25), 0.04)
    upper = _ramp(0.11 + 0.04 * (v - top) - np.abs(u - 0.01), 0.02) * _ramp(dia - 0.05 - v, 0.02)
    knob = _ramp(1 - _ellipse(u, v, 0.11, top + 0.2, 0.055, 0.045 / aspect * 0.5), 0.1)
    media = 0.85 * np.maximum(np.maximum(heart, upper), knob)
    img = img * (1 - media) + HEART * media
    trachea = _ramp(0.028 - np.abs(u - 0.005), 0.01) * _ramp(top + 0.24 - v, 0.02)
    return img - 0.2 * trachea


def _ribs(u, v, a, t, top, dia, spacing):
    """Posterior and anterior ribs, and the clavicles."""
    thorax = _ramp(t + 0.04 - a, 0.02) * _ramp(v - (top - 0.03), 0.02) * _ramp(dia + 0.03 - v, 0.03)
    slope = 0.13 * (a / t) ** 2
    post = np.maximum(np.cos(2 * np.pi * (v - top - slope) / spacing), 0) ** 3
    ant = np.maximum(np.cos(2 * np.pi * (v - top + 0.6 * slope) / (spacing * 1.15)), 0) ** 4
    ribs = (0.10 * post + 0.04 * ant) * thorax * _ramp(a - 0.05, 0.03)
    clav_v = top + 0.015 - 0.07 * (a - 0.08)
    clav = _ramp(0.016 - np.abs(v - clav_v), 0.008) * _ramp(a - 0.06, 0.02) * _ramp(0.62 - a, 0.04)
    return ribs + 0.22 * clav


# ---- lateral view ----------------------------------------------------------------------------
def _lateral(rng, frng, geo: _Geometry, study: StudySpec) -> np.ndarray:
    """Patient facing image left: anterior on the left, spine on the right."""
    f, anat = study.findings, study.anatomy
    u, v = geo.u, geo.v
    top, dia = anat.lung_top + 0.02, anat.diaphragm + float(rng.normal(0, 0.01))
    img = np.full(u.shape, AIR, np.float32)
    img += (SOFT - AIR) * _ramp(1 - _ellipse(u, v, 0.0, 0.55, 0.86, 0.62), 0.05)
    dome = dia - 0.07 * (1 - np.clip(((u - 0.05) / 0.62) ** 2, 0, 1)) + 0.05 * u
    lung = _ramp(1 - _ellipse(u, np.minimum(v, 0.45), 0.05, 0.45, 0.62, 0.45 - top), 0.04)
    lung = lung * _ramp(dome - v, 0.01)
    lung_density = LUNG + 0.05 + 0.04 * np.exp(-(_noise_field(rng, u.shape, 24) / 0.45) ** 2)
    if f["effusion"].present:  # fluid settles in the posterior costophrenic sulcus
        height = (0.06, 0.1, 0.15)[f["effusion"].severity]
        post = np.clip((u + 0.2) / 0.8, 0, 1)
        lung = lung * (1 - _ramp(v - (dome - height * post ** 2), 0.02))
    cons = 0.0
    if f["consolidation"].present:
        cons = _blob(frng, u, v, 0.2, dia - 0.17, 0.2, geo.aspect)
    img = img * (1 - lung) + lung_density * lung + cons * lung
    scale = 1.25 if f["cardiomegaly"].present else 1.0
    heart = _ramp(1 - _ellipse(u, v, -0.22, dia - 0.1, 0.27 * scale, 0.15 * scale), 0.06)
    img = img * (1 - heart) + (HEART - 0.08) * heart
    bodies = np.maximum(np.cos(2 * np.pi * v / 0.06), 0) ** 0.5
    spine = _ramp(0.08 - np.abs(u - 0.58), 0.02) * _ramp(v - top + 0.1, 0.02)
    sternum = _ramp(0.02 - np.abs(u + 0.64 + 0.1 * (v - 0.3)), 0.01)
    sternum = sternum * _ramp(0.25 - np.abs(v - 0.45), 0.05)
    return img + (0.12 + 0.08 * bodies) * spine + 0.08 * sternum


# ---- devices, exposure -----------------------------------------------------------------------
_FRONTAL_PATHS = {
    "ett": ([(0.0, -0.02), (0.005, 0.12), (0.01, 0.27)], 0.03),
    "ng": ([(0.02, -0.02), (0.03, 0.35), (0.05, 0.72), (0.22, 0.82), (0.36, 0.8)], 0.022),
    "cvc": ([(-0.3, -0.02), (-0.2, 0.12), (-0.09, 0.22), (-0.07, 0.37)], 0.022),
    "picc": ([(0.99, 0.32), (0.6, 0.24), (0.3, 0.2), (0.05, 0.24), (-0.06, 0.38)], 0.02),
    "pacer": ([(0.55, 0.2), (0.3, 0.24), (0.02, 0.3), (-0.06, 0.46), (0.1, 0.66)], 0.016),
}
_LATERAL_PATHS = {
    "ett": ([(-0.05, -0.02), (-0.08, 0.15), (-0.1, 0.28)], 0.018),
    "ng": ([(0.0, -0.02), (-0.02, 0.4), (0.0, 0.75), (-0.25, 0.88)], 0.013),
    "cvc": ([(0.1, -0.02), (-0.05, 0.15), (-0.12, 0.35)], 0.013),
    "picc": ([(0.2, 0.2), (-0.05, 0.22), (-0.12, 0.38)], 0.011),
    "pacer": ([(-0.6, 0.2), (-0.4, 0.3), (-0.2, 0.5), (-0.25, 0.65)], 0.009),
}


def _draw_devices(geo: _Geometry, study: StudySpec, lateral: bool) -> np.ndarray | None:
    kinds = study.findings["devices"].devices if study.findings["devices"].present else ()
    if not kinds:
        return None
    layer = Image.new("L", (geo.cols, geo.rows), 0)
    draw = ImageDraw.Draw(layer)
    paths = _LATERAL_PATHS if lateral else _FRONTAL_PATHS
    for kind in kinds:
        points, width = paths[kind]
        xy = [geo.to_pixels(u, v) for u, v in points]
        draw.line(xy, fill=235, width=max(2, round(width * geo.cols)), joint="curve")
        if kind == "pacer":  # the generator: a bright rounded box
            x, y = xy[0]
            half = 0.07 * geo.cols
            box = (x - half, y - half * 0.6, x + half, y + half * 0.6)
            draw.rounded_rectangle(box, radius=half / 3, fill=250)
    layer = layer.filter(ImageFilter.GaussianBlur(radius=max(1.0, geo.cols / 800)))
    return np.asarray(layer, np.float32) / 255.0


def _upsample(density: np.ndarray, rows: int, cols: int) -> np.ndarray:
    small = Image.fromarray(density.astype(np.float32), "F")
    return np.array(small.resize((cols, rows), Image.BILINEAR))


class _ExposureCurve:
    """Exposure (gamma, window) and detector noise: portable films are noisier and flatter."""

    def __init__(self, rng, portable: bool):
        self.gamma = float(rng.uniform(0.8, 1.2))
        self.lo, self.hi = float(rng.uniform(-0.02, 0.05)), float(rng.uniform(0.85, 1.05))
        self.sigma = float(rng.uniform(0.012, 0.03)) * (1.4 if portable else 1.0)

    def __call__(self, density: np.ndarray) -> np.ndarray:
        x = np.clip(density, 0, 1).astype(np.float32) ** np.float32(self.gamma)
        return (x - np.float32(self.lo)) * np.float32(1 / (self.hi - self.lo))

    def quantise(self, rng, img: np.ndarray) -> np.ndarray:
        noise = rng.standard_normal(img.shape, dtype=np.float32)
        img += np.float32(self.sigma) * noise
        img *= 255
        img += 0.5
        return np.clip(img, 0, 255, out=img).astype(np.uint8)
