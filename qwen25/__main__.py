from qwen25.cli import main

raise SystemExit(main())
