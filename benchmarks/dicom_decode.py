"""What compressed DICOM costs the sharder, per image, against uncompressed DICOM in the same run.

    python benchmarks/dicom_decode.py [--repeat 5]

Writes one full-size (3000x2500, 12-bit, windowed) radiograph as uncompressed DICOM, re-encodes it
with GDCM into each lossless syntax a PACS may use (JPEG lossless SV1, JPEG-LS, JPEG 2000, RLE),
then times lapvqa's whole per-image path (decode, window, resize to 384, JPEG encode) on one core
and prints file size, ms/image and the ratio to uncompressed. Plan sharding time and cores from
it: the decode, not the 384-px work, dominates for compressed archives.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from shard import _base  # noqa: E402  the shard benchmark's textured radiograph

from lapvqa.shard.images import process_image  # noqa: E402
from mimic_fixtures import compress_dicom, write_dicom  # noqa: E402

SYNTAXES = ("jpeg_lossless", "jpeg_ls", "jpeg2000_lossless", "rle")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed decodes per file")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        arr = _base(3000, 2500, 0).astype(np.float32) * (4095 / 255)  # 8-bit texture -> 12-bit
        write_dicom(d / "uncompressed.dcm", arr, window=(2048, 4096))
        for s in SYNTAXES:
            compress_dicom(d / "uncompressed.dcm", d / f"{s}.dcm", s)
        ref_jpeg, base_ms = None, None
        print(f"{'syntax':20s} {'MB':>6s} {'ms/image':>9s} {'x uncompressed':>15s}")
        for name in ("uncompressed", *SYNTAXES):
            data = (d / f"{name}.dcm").read_bytes()
            out = process_image(data).jpeg  # warm-up; lossless: must equal the uncompressed result
            ref_jpeg = ref_jpeg or out
            assert out == ref_jpeg, f"{name}: shard image differs from the uncompressed one"
            t = time.perf_counter()
            for _ in range(args.repeat):
                process_image(data)
            ms = (time.perf_counter() - t) / args.repeat * 1000
            base_ms = base_ms or ms
            print(f"{name:20s} {len(data) / 1e6:6.1f} {ms:9.1f} {ms / base_ms:15.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
