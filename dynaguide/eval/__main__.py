"""``python -m dynaguide.eval KIND DATASET_DIR ...``: same as ``dynaguide eval``."""

from dynaguide.eval.cli import main

raise SystemExit(main())
