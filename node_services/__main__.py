"""``python -m node_services`` runs the command line."""

from node_services.cli import main

raise SystemExit(main())
