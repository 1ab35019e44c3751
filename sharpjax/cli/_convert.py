"""``sharpjax data convert cifar10|cifar100|imagefolder SRC DST``.

Writes ArrayRecord shards and ``metadata.json`` (see
:mod:`sharpjax.data._arrayrecord`) that ``sharpjax train --data arrayrecord
--data-dir DST`` reads through grain.
"""

from __future__ import annotations

import os
import textwrap
import time

FORMATS = ("cifar10", "cifar100", "imagefolder")


def add_data_command(sub, fmt) -> None:
  d = sub.add_parser(
      "data", formatter_class=fmt,
      help="convert a data set to ArrayRecord shards for --data arrayrecord",
      description=textwrap.fill(
          "`sharpjax data convert cifar10|cifar100 SRC DST` reads CIFAR's "
          "python-pickle release (through a restricted unpickler: a file "
          "that would import anything but uint8 arrays is refused); "
          "`sharpjax data convert imagefolder SRC DST` reads SRC/train/CLASS/"
          "*.jpg|png and SRC/val/CLASS/... (ImageNet's layout; SRC/CLASS/... "
          "alone is a training split). Both write ArrayRecord shards, one "
          "example per record, the labels and metadata.json into DST. Nothing "
          "is downloaded."))
  d.add_argument("action", choices=("convert",), metavar="action",
                 help="convert: write the shards (the only action)")
  d.add_argument("format", choices=FORMATS, metavar="format",
                 help="what SRC holds: " + ", ".join(FORMATS))
  d.add_argument("src", help="the source directory")
  d.add_argument("dst", help="the output directory (created)")
  d.add_argument("--records-per-shard", type=int, default=10_000,
                 help="records per ArrayRecord file (default 10000)")


def cmd_data(args) -> int:
  from sharpjax.data import _arrayrecord  # pylint: disable=g-import-not-at-top
  if args.records_per_shard < 1:
    raise ValueError("--records-per-shard must be an integer >= 1, got "
                     f"{args.records_per_shard}.")
  if not os.path.isdir(args.src):
    raise ValueError(f"SRC {args.src}: no such directory.")
  t0 = time.perf_counter()
  if args.format == "imagefolder":
    meta = _arrayrecord.convert_imagefolder(
        args.src, args.dst, records_per_shard=args.records_per_shard)
  else:
    meta = _arrayrecord.convert_cifar(
        args.src, args.dst, int(args.format[len("cifar"):]),
        records_per_shard=args.records_per_shard)
  splits = ", ".join(f"{k} {v['num_examples']} examples in "
                     f"{len(v['files'])} shards"
                     for k, v in meta["splits"].items())
  print(f"wrote {args.dst}: {meta['source']}, {meta['num_classes']} classes; "
        f"{splits} ({time.perf_counter() - t0:.1f} s). Train with --data "
        f"arrayrecord --data-dir {args.dst}.", flush=True)
  return 0
