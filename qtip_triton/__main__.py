from qtip_triton.cli import main

raise SystemExit(main())
