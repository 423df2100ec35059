"""`python -m catalog` is `dask catalog`."""

from catalog.cli import main

if __name__ == "__main__":
    main(prog_name="python -m catalog")
