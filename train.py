"""Joint training of MultiModel. See `python train.py --help` and README.md."""

from multimodel import cli

if __name__ == "__main__":
  cli.train_main()
