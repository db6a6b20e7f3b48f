from fleetcast.cli import main

raise SystemExit(main())
