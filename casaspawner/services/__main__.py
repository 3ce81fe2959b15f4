from casaspawner.services.app import main

raise SystemExit(main())
