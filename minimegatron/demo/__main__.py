"""``python -m minimegatron.demo`` (what ``make demo`` runs)."""
from minimegatron.demo.cli import main

if __name__ == "__main__":
    main()
