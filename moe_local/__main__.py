from moe_local.cli import main

main()
