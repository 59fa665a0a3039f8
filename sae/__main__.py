from sae.cli import main

raise SystemExit(main())
