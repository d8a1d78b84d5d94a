from lossfloor.cli import main

raise SystemExit(main())
