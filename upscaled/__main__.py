from upscaled.cli import main

raise SystemExit(main())
