from redpacket.cli.main import main

raise SystemExit(main())
