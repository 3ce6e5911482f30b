"""``python -m stages.cli``: the `uplvp` command."""
from stages.cli import main

main()
