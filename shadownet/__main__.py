from shadownet.cli import main

raise SystemExit(main())
