from moe_local.cli import main

if __name__ == "__main__":  # not when a spawned process (the server's HTTP side) imports it
    main()
