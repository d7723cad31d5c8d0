"""`python -m mmkit ...` == `mmkit ...` (so `accelerate launch -m mmkit train ...` works)."""

from mmkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
