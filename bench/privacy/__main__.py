from .evaluate import main

if __name__ == "__main__":  # not when a spawned party process imports this module as __mp_main__
    main()
